//! The config the hub pushes (`ConfigPush`): validated, applied live, kept on disk as the last good one.
//!
//! The agent's own file names its identity, the hub, its local broker and its queue; what it forwards
//! comes from the hub. Until a config has ever been pushed, the `[[routes]]` of its own file are the
//! bootstrap config (version 0). A push is parsed and validated ([`EffectiveConfig::from_toml_str`]), must
//! name this site and hash to the version it claims, is written to `data_dir/pushed-config.toml` (written
//! to a temporary file, synced, renamed: a crash leaves the old or the new file, never half of one), and
//! only then put in force, so an agent that starts while the hub is unreachable runs on the last config it
//! acknowledged. A refused push changes nothing; its reason goes back to the hub in `ConfigAck`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shared::config::{version_of, EffectiveConfig, Route};
use shared::wire::{ConfigRejectReason, ConfigRejection};
use tracing::{debug, info, warn};

use crate::error::AgentError;
use crate::routes::{LiveRoutes, Routes};

/// The last good pushed config, in the data directory.
pub(crate) const PUSHED_FILE: &str = "pushed-config.toml";

/// Where pushes are checked, kept and put in force.
#[derive(Debug)]
pub(crate) struct Pushed {
    path: PathBuf,
    site: String,
    live: Arc<LiveRoutes>,
}

/// The routes to start with: the last good pushed config if there is one (and it still checks out),
/// else the bootstrap routes of the agent's own file, as version 0.
///
/// # Errors
/// [`AgentError::InvalidRoute`] when the file's own routes do not compile.
pub(crate) fn initial_routes(
    data_dir: &Path,
    site: &str,
    file_routes: &[Route],
) -> Result<(Routes, u64), AgentError> {
    let path = data_dir.join(PUSHED_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => match check(site, version_of(&text), &text) {
            Ok((config, version)) => match Routes::from_effective(&config) {
                Ok(routes) => {
                    info!(version, path = %path.display(), captures = config.capture.len(), "running the last config the hub pushed");
                    return Ok((routes, version));
                }
                Err(e) => {
                    warn!(path = %path.display(), cause = %e, "the last pushed config does not compile; using the routes of the agent's own file until the hub pushes again");
                }
            },
            Err(rejected) => {
                warn!(path = %path.display(), cause = %rejected.detail, "the last pushed config is not usable; using the routes of the agent's own file until the hub pushes again");
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %path.display(), cause = %e, "cannot read the last pushed config; using the routes of the agent's own file");
        }
    }
    let bootstrap = EffectiveConfig::bootstrap(site, file_routes);
    Ok((Routes::from_effective(&bootstrap)?, 0))
}

/// Parses and checks a pushed document: valid, for `site`, hashing to `version`.
fn check(site: &str, version: u64, text: &str) -> Result<(EffectiveConfig, u64), ConfigRejection> {
    let invalid = |detail: String| ConfigRejection {
        reason: ConfigRejectReason::Invalid,
        detail,
    };
    let config = EffectiveConfig::from_toml_str(text).map_err(|e| invalid(e.to_string()))?;
    if config.site != site {
        return Err(invalid(format!(
            "the config is for site {:?}, this agent is {site:?}",
            config.site
        )));
    }
    let actual = version_of(text);
    if actual != version {
        return Err(invalid(format!(
            "the config hashes to version {actual}, the push said {version}"
        )));
    }
    Ok((config, version))
}

impl Pushed {
    /// Pushes for `site`, kept in `data_dir`, put in force in `live`.
    pub(crate) fn new(data_dir: &Path, site: &str, live: Arc<LiveRoutes>) -> Self {
        Self {
            path: data_dir.join(PUSHED_FILE),
            site: site.to_owned(),
            live,
        }
    }

    /// The version in force.
    pub(crate) fn version(&self) -> u64 {
        self.live.version()
    }

    /// Checks, keeps and applies a push (blocking: it syncs a file). A version already in force is
    /// acknowledged again without work.
    ///
    /// # Errors
    /// [`ConfigRejection`] with the reason; nothing changed.
    pub(crate) fn apply(&self, version: u64, text: &str) -> Result<(), ConfigRejection> {
        if version == self.live.version() && version != 0 {
            return Ok(());
        }
        let (config, version) = check(&self.site, version, text)?;
        let routes = Routes::from_effective(&config).map_err(|e| ConfigRejection {
            reason: ConfigRejectReason::Invalid,
            detail: e.to_string(),
        })?;
        write_atomically(&self.path, text).map_err(|e| ConfigRejection {
            reason: ConfigRejectReason::ApplyFailed,
            detail: format!("cannot keep it at {}: {e}", self.path.display()),
        })?;
        self.live.replace(routes, version);
        // The uplink reports it (`crate::events::ConfigPushed`).
        debug!(
            version,
            captures = config.capture.len(),
            "pushed config in force"
        );
        Ok(())
    }
}

/// Writes `text` to `path` so that a crash leaves either the old file or the new one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::config::{Capture, RetainHandling, EFFECTIVE_FORMAT};

    fn doc(site: &str, filter: &str) -> String {
        EffectiveConfig {
            format: EFFECTIVE_FORMAT,
            site: site.to_owned(),
            lanes: Vec::new(),
            capture: vec![Capture {
                filter: filter.to_owned(),
                qos: None,
                retain: RetainHandling::Keep,
                priority: 0,
                ttl: None,
                routes: vec!["r".to_owned()],
            }],
            accept: Vec::new(),
        }
        .to_toml()
    }

    fn live(dir: &Path) -> (Arc<LiveRoutes>, Pushed) {
        let (routes, version) = initial_routes(
            dir,
            "line1",
            &[Route {
                filter: "boot/#".to_owned(),
                qos: None,
                retain: true,
            }],
        )
        .expect("routes");
        let live = Arc::new(LiveRoutes::new(routes, version));
        let pushed = Pushed::new(dir, "line1", Arc::clone(&live));
        (live, pushed)
    }

    #[test]
    fn a_push_is_applied_live_and_kept_as_last_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (live, pushed) = live(dir.path());
        assert_eq!(live.version(), 0);
        assert!(live.decide("boot/x").is_some());
        let text = doc("line1", "telemetry/#");
        let version = version_of(&text);
        pushed.apply(version, &text).expect("applied");
        assert_eq!(live.version(), version);
        assert!(live.decide("telemetry/a").is_some());
        assert!(live.decide("boot/x").is_none());
        // A restart runs the last good config, not the file's routes.
        let (live2, _) = self::live(dir.path());
        assert_eq!(live2.version(), version);
        assert!(live2.decide("telemetry/a").is_some());
    }

    #[test]
    fn bad_pushes_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (live, pushed) = live(dir.path());
        let good = doc("line1", "telemetry/#");
        pushed.apply(version_of(&good), &good).expect("applied");
        let before = live.version();

        let other = doc("line2", "x/#");
        let r = pushed
            .apply(version_of(&other), &other)
            .expect_err("wrong site");
        assert_eq!(r.reason, ConfigRejectReason::Invalid);
        assert!(r.detail.contains("line2"), "{}", r.detail);

        let changed = doc("line1", "y/#");
        let r = pushed
            .apply(version_of(&changed) ^ 1, &changed)
            .expect_err("bad version");
        assert_eq!(r.reason, ConfigRejectReason::Invalid);
        assert!(r.detail.contains("hashes to version"), "{}", r.detail);

        let garbage = "format = 1\nsite = \"line1\"\n[[capture]]\nfilter = \"a/#/b\"\n";
        let r = pushed
            .apply(version_of(garbage), garbage)
            .expect_err("invalid filter");
        assert_eq!(r.reason, ConfigRejectReason::Invalid, "{}", r.detail);

        assert_eq!(live.version(), before);
        assert!(live.decide("telemetry/a").is_some());
        let kept = fs::read_to_string(dir.path().join(PUSHED_FILE)).expect("kept");
        assert_eq!(kept, good);
    }

    /// The last-good file as the first release of the document wrote it (`format = 1`, before `lanes`
    /// existed; shared/src/config/effective.rs). Later additions are optional and omitted when empty, so
    /// such a file still loads as it is, with the same version: the hub sees the agent running the config it
    /// would push and does not push it again.
    const FIRST_FORMAT: &str = r#"format = 1
site = "line1"

[[capture]]
filter = "handoff/#"
retain = "keep"
priority = 0
routes = ["handoff"]

[[capture]]
filter = "telemetry/#"
qos = 1
retain = "keep"
priority = 0
routes = ["telemetry"]

[[accept]]
filter = "cmd/#"
routes = ["commands"]
"#;

    #[test]
    fn a_last_good_config_of_the_first_format_is_still_run_with_its_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(PUSHED_FILE), FIRST_FORMAT).expect("write");
        let (live, _) = live(dir.path());
        assert_eq!(live.version(), version_of(FIRST_FORMAT));
        assert!(live.decide("telemetry/robot5/temp").is_some());
        assert!(live.decide("handoff/part42").is_some());
        assert!(
            live.decide("boot/x").is_none(),
            "the file's bootstrap routes are not used"
        );
        // What the current build would write for the same routes is the same text, so the same version.
        let parsed = EffectiveConfig::from_toml_str(FIRST_FORMAT).expect("parses");
        assert_eq!(parsed.to_toml(), FIRST_FORMAT);
    }

    #[test]
    fn a_last_good_config_a_newer_build_wrote_is_not_misread() {
        // A downgraded agent finds a file of a later format: it runs its own bootstrap routes until the
        // hub pushes again, rather than guessing at a document it does not know.
        for newer in [
            FIRST_FORMAT.replacen("format = 1", "format = 2", 1),
            FIRST_FORMAT.replacen("priority = 0\n", "priority = 0\nsampling = 0.5\n", 1),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::write(dir.path().join(PUSHED_FILE), &newer).expect("write");
            let (live, _) = live(dir.path());
            assert_eq!(live.version(), 0, "{newer}");
            assert!(live.decide("boot/x").is_some());
            assert!(live.decide("telemetry/robot5/temp").is_none());
            // The file is left for the newer build to find again.
            assert_eq!(
                fs::read_to_string(dir.path().join(PUSHED_FILE)).expect("kept"),
                newer
            );
        }
    }
}
