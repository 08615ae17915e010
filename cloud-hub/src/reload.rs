//! Live config reload: on SIGHUP, and when the config file changes (checked every second), the hub reads
//! its file again. A file that fails validation is refused with every problem logged, and the running
//! config stays. A valid one has its routes put in force at once: the downlink subscriptions follow, every
//! connected agent whose share changed gets a `ConfigPush`, and the next message is routed by it. Sites
//! added are admitted and sites removed are refused and closed at once (`crate::sites`). Changes to
//! sections that are wired at start (listener, TLS, broker, limits, dedup, downlink, a site's namespace)
//! are logged as needing a restart.
//!
//! Polling the file's length and modification time once a second costs one `stat` and catches editors
//! that replace the file (a new inode) as well as those that rewrite it, with no platform watcher.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shared::config::{load_hub, HubConfig, HubConfigDiff};
use shared::policy::route::RouteTable;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::sites::Sites;

/// How often the file is checked for changes.
const POLL: Duration = Duration::from_secs(1);

/// What identifies a version of the file without reading it.
fn stamp(path: &std::path::Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Follows `path` until `stop`, sending each valid new config's routes on `routes`.
pub(crate) async fn follow(
    path: PathBuf,
    mut current: HubConfig,
    (routes, sites): (watch::Sender<Arc<RouteTable>>, Arc<Sites>),
    stop: CancellationToken,
) {
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(cause = %e, "cannot listen for SIGHUP; the config file is still checked every second");
            None
        }
    };
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let why = tokio::select! {
            () = stop.cancelled() => return,
            () = signalled => "SIGHUP",
            _ = tick.tick() => {
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                "the file changed"
            }
        };
        if let Some(next) = reload(&path, &current, (&routes, &sites), why) {
            current = next;
        }
    }
}

/// Reads, validates and applies the file; the new config if it was applied.
fn reload(
    path: &std::path::Path,
    current: &HubConfig,
    (routes, sites): (&watch::Sender<Arc<RouteTable>>, &Sites),
    why: &str,
) -> Option<HubConfig> {
    let new = match load_hub(path) {
        Ok(new) => new,
        Err(e) => {
            error!(path = %path.display(), trigger = why, "config reload refused; the running config stays:\n{e}");
            return None;
        }
    };
    let diff = HubConfigDiff::between(current, &new);
    if diff.is_empty() {
        info!(path = %path.display(), trigger = why, "config reloaded: nothing changed");
        return Some(new);
    }
    let table = match RouteTable::new(&new) {
        Ok(table) => table,
        Err(errors) => {
            let listed: Vec<String> = errors.iter().map(ToString::to_string).collect();
            error!(path = %path.display(), trigger = why, errors = %listed.join("; "), "config reload refused; the running config stays");
            return None;
        }
    };
    info!(path = %path.display(), trigger = why, "config reloaded; routes in force now:\n{diff}");
    // Sites first: a route naming a new site must find it admitted.
    let changes = match sites.apply(&new) {
        Ok(changes) => changes,
        Err(e) => {
            error!(path = %path.display(), trigger = why, cause = %e, "config reload refused; the running config stays");
            return None;
        }
    };
    if !changes.added.is_empty() {
        info!(sites = %changes.added.join(", "), "sites admitted from now on");
    }
    if !changes.removed.is_empty() {
        warn!(sites = %changes.removed.join(", "), "sites removed: refused from now on, their links closed");
    }
    let mut restart: Vec<String> = diff.restart.iter().map(|s| (*s).to_owned()).collect();
    for site in &changes.restart {
        restart.push(format!("sites.{site}.namespace"));
    }
    // `log` is put in force at once; `log_format` still needs a restart (the same section).
    if current.log != new.log && apply_log(&new.log) && current.log_format == new.log_format {
        restart.retain(|section| section != "log");
    }
    if current.downlink != new.downlink {
        restart.push("downlink".to_owned());
    }
    if !restart.is_empty() {
        warn!(sections = %restart.join(", "), "these config changes take effect only after a restart");
    }
    routes.send_replace(Arc::new(table));
    Some(new)
}

/// Puts a changed `log` in force (`meshbridge_metrics::logging::reload`); whether it did.
fn apply_log(log: &str) -> bool {
    use meshbridge_metrics::logging::{reload, Reloaded};
    match reload(log, meshbridge_broker::embedded::QUIET_RUMQTTD_LOGS) {
        Ok(Reloaded::Applied(filter)) => {
            info!(%filter, "log filter now in force");
            true
        }
        Ok(Reloaded::RustLogWins) => {
            info!("RUST_LOG is set and stays in force; `log` applies at a start without it");
            true
        }
        Err(e) => {
            warn!(cause = %e, "cannot apply the new log filter; the one in force stays");
            false
        }
    }
}
