//! Debian's Mosquitto as a real third-party broker, at the edge (agent external mode) or at the cloud (hub
//! external mode). Installed by `scripts/install-test-deps.sh`; without it tests skip loudly, or fail under `CI=true`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::Proc;

/// The mosquitto executable, if installed (PATH, or Debian's `/usr/sbin`, which is not on every PATH).
pub fn executable() -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("mosquitto"))
            .find(|p| p.is_file())
    });
    in_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/mosquitto");
        sbin.is_file().then_some(sbin)
    })
}

/// Whether Mosquitto is installed.
pub fn is_installed() -> bool {
    executable().is_some()
}

/// `true` when `test` must skip because Mosquitto is missing: `if mosquitto::skip("..") { return; }`.
///
/// # Panics
/// Under `CI=true`, where a missing Mosquitto fails the test (see [`crate::prereq`]).
pub fn skip(test: &str) -> bool {
    crate::prereq::missing(
        test,
        is_installed(),
        "mosquitto is not installed",
        "scripts/install-test-deps.sh installs it",
    )
}

/// How to run a Mosquitto.
#[derive(Debug, Clone)]
pub struct MosquittoOptions {
    /// Listener address (always loopback).
    pub addr: SocketAddr,
    /// Keep sessions and queued messages in a persistence file across restarts.
    pub persistence: bool,
    /// `max_queued_messages`; 0 = unlimited (what a wrapped broker needs so it never drops for a slow
    /// agent session), `None` keeps Mosquitto's default of 1000.
    pub max_queued_messages: Option<u32>,
    /// Extra configuration lines (a bridge, for example).
    pub extra: String,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        Self {
            addr: crate::net::free_tcp(),
            persistence: false,
            max_queued_messages: Some(0),
            extra: String::new(),
        }
    }
}

/// A running Mosquitto; stopped when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    /// The broker process.
    pub proc: Proc,
    /// Where clients connect.
    pub addr: SocketAddr,
}

impl Mosquitto {
    /// Writes `<dir>/<name>.conf`, starts `mosquitto -c` on it and waits until it accepts connections.
    ///
    /// # Panics
    /// If Mosquitto is not installed (check [`skip`] first) or does not come up.
    pub async fn start(name: &str, dir: &Path, options: &MosquittoOptions) -> Self {
        let exe = executable().expect("mosquitto is installed (check mosquitto::skip first)");
        let data = dir.join(format!("{name}-data"));
        std::fs::create_dir_all(&data).expect("create the mosquitto data dir");
        let mut conf = format!(
            "listener {} {}\nallow_anonymous true\nlog_dest stdout\nlog_type error\nlog_type warning\n\
             log_type notice\nlog_type information\nconnection_messages true\n",
            options.addr.port(),
            options.addr.ip()
        );
        // When run as root Mosquitto switches to the `mosquitto` user, which could not write our temp dir.
        conf.push_str("user root\n");
        if options.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\n",
                data.display()
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        if let Some(n) = options.max_queued_messages {
            conf.push_str(&format!("max_queued_messages {n}\n"));
        }
        conf.push_str(&options.extra);
        conf.push('\n');
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).expect("write the mosquitto config");
        let mut proc = Proc::start_args(
            name,
            &exe,
            &["-c".to_owned(), path.to_string_lossy().into_owned()],
            dir,
        );
        proc.wait_ready(options.addr, Duration::from_secs(10)).await;
        Self {
            proc,
            addr: options.addr,
        }
    }
}
