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

/// A Mosquitto command-line client (`mosquitto_sub`, `mosquitto_pub`) from Debian's `mosquitto-clients`.
pub fn client_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// `true` when `test` must skip because `mosquitto_sub` / `mosquitto_pub` are missing.
///
/// # Panics
/// Under `CI=true`, where a missing tool fails the test (see [`crate::prereq`]).
pub fn clients_skip(test: &str) -> bool {
    crate::prereq::missing(
        test,
        client_tool("mosquitto_sub").is_some() && client_tool("mosquitto_pub").is_some(),
        "mosquitto_sub / mosquitto_pub are not installed",
        "scripts/install-test-deps.sh installs Debian's mosquitto-clients",
    )
}

/// A running `mosquitto_sub -v -d`: its lines, split into the messages it printed (`topic payload`) and
/// libmosquitto's debug lines (`Client <id> received SUBACK`, ...). The process is killed on drop, without
/// a DISCONNECT, as a crashing subscriber would go.
pub struct MosquittoSub {
    child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl MosquittoSub {
    /// Starts `mosquitto_sub -h <addr> -p <port> -v -d` with `args` (client id, `-c`, `-q`, `-t`, ...),
    /// under coreutils' `stdbuf -oL`: into a pipe its stdout is block-buffered, and the lines would
    /// only come when it exits.
    ///
    /// # Panics
    /// If `mosquitto_sub` cannot be started.
    pub fn start(addr: SocketAddr, args: &[&str]) -> Self {
        let program = client_tool("mosquitto_sub").expect("mosquitto_sub is installed");
        let mut child = tokio::process::Command::new("stdbuf")
            .arg("-oL")
            .arg(program)
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-v", "-d"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start mosquitto_sub");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line);
            }
        });
        Self {
            child,
            lines,
            reader,
        }
    }

    fn all(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The messages printed so far, as `topic payload` lines, in arrival order.
    pub fn messages(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed "))
            .collect()
    }

    /// Every line, debug lines included (what a failing assertion prints).
    pub fn transcript(&self) -> String {
        self.all().join("\n")
    }

    /// Waits until a line contains `needle`; `false` after `timeout`.
    pub async fn wait_line(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.all().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `pred` holds for the messages printed; `false` after `timeout`.
    pub async fn wait_messages(&self, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.messages()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the client (no DISCONNECT) and waits for it to be gone.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        self.reader.abort();
    }
}
