//! The path's limits on the agent: its configured `uplink.max_message_size` combined with what the hub
//! last announced in `Welcome` (`shared::limits`), persisted in `data_dir` so that an agent restarted
//! while the hub is down still refuses at PUBLISH time what the hub would drop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shared::config::AgentConfig;
use shared::limits::{PathLimits, SharedLimits};
use tracing::{info, warn};

/// File in `data_dir` holding the hub's last announced limits (text, see [`PathLimits::to_text`]).
pub const LIMITS_FILE: &str = "hub-limits";

/// The limits in force at start-up: the config's, tightened by the persisted announcement if there is one.
/// A missing file is normal (the agent never reached a hub); an unreadable one is warned about and
/// ignored, because the config's limit still holds and the next `Welcome` rewrites it.
pub(crate) fn load(cfg: &AgentConfig) -> Arc<SharedLimits> {
    let max_message_size = u32::try_from(cfg.uplink.max_message_size.as_u64()).unwrap_or(u32::MAX);
    let max_frame_size = u32::try_from(cfg.uplink.max_frame_size.as_u64()).unwrap_or(u32::MAX);
    let limits = Arc::new(SharedLimits::new(
        max_message_size,
        max_frame_size,
        &cfg.site,
    ));
    let path = cfg.data_dir.join(LIMITS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match PathLimits::from_text(&text) {
            Ok(announced) => {
                let now = limits.announce(announced);
                info!(
                    path = %path.display(),
                    max_message_size = now.max_message_size,
                    max_topic_len = now.max_topic_len,
                    max_frame_size = now.max_frame_size,
                    "limits from the hub's last announcement"
                );
            }
            Err(cause) => {
                warn!(path = %path.display(), %cause, "ignoring unreadable hub limits; using uplink.max_message_size until the hub is reached");
            }
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(cause) => {
            warn!(path = %path.display(), %cause, "cannot read the hub's last limits; using uplink.max_message_size until the hub is reached");
        }
    }
    limits
}

/// Takes a `Welcome`'s limits into account and persists them (write to a temporary file, then rename, so
/// a crash leaves the old or the new file, never half of one). A write failure is logged: the limits
/// still apply in memory.
pub(crate) async fn announce(limits: &SharedLimits, data_dir: &Path, announced: PathLimits) {
    let before = limits.current();
    let now = limits.announce(announced);
    if now != before {
        info!(
            max_message_size = now.max_message_size,
            max_topic_len = now.max_topic_len,
            max_frame_size = now.max_frame_size,
            hub_max_message_size = announced.max_message_size,
            hub_max_topic_len = announced.max_topic_len,
            "limits in force changed after the hub's announcement"
        );
    }
    let path = data_dir.join(LIMITS_FILE);
    // Each priority lane's connection announces; a temporary file of its own per write keeps two lanes'
    // writes from renaming each other's file away.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp: PathBuf = data_dir.join(format!("{LIMITS_FILE}.{n}.tmp"));
    let written = async {
        tokio::fs::write(&tmp, announced.to_text()).await?;
        tokio::fs::rename(&tmp, &path).await
    }
    .await;
    if let Err(cause) = written {
        warn!(path = %path.display(), %cause, "cannot persist the hub's limits; a restart before the next connection falls back to uplink.max_message_size");
    }
}
