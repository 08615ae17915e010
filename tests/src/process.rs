//! A program under test running as a child process, its output in a log file.
//!
//! The log is printed to stderr when the `Proc` is dropped during a panic (a failing test), so a failure
//! shows what the hub and agents said. Dropping a `Proc` kills the process: no test leaves one behind.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often waits poll.
const POLL: Duration = Duration::from_millis(20);

/// A running (or stopped) program.
#[derive(Debug)]
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    /// Environment variables set for every incarnation.
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// Log length when the current incarnation started, so readiness looks only at its own lines.
    log_start: u64,
}

impl Proc {
    /// Starts `program --config <config>` with output appended to `<log_dir>/<name>.log`.
    pub fn start(name: &str, program: &Path, config: &Path, log_dir: &Path) -> Self {
        Self::start_args(
            name,
            program,
            &["--config".to_owned(), config.to_string_lossy().into_owned()],
            log_dir,
        )
    }

    /// Starts `program` with arbitrary arguments, output appended to `<log_dir>/<name>.log`.
    pub fn start_args(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Self {
        Self::start_env(name, program, args, &[], log_dir)
    }

    /// [`Self::start_args`] with `env` set for the program (and for its restarts).
    pub fn start_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Self {
        let mut proc = Self {
            name: name.to_owned(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: env.to_vec(),
            log: log_dir.join(format!("{name}.log")),
            child: None,
            log_start: 0,
        };
        proc.spawn();
        proc
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        self.log_start = log.metadata().map_or(0, |m| m.len());
        let err = log.try_clone().expect("clone the log file handle");
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// Starts the program again with the same arguments (same config, same data directory) after it was
    /// stopped; the log continues in the same file.
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "{}: restart while still running",
            self.name
        );
        self.spawn();
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until `addr` accepts TCP connections (the programs' readiness signal), failing early if the
    /// process exits.
    pub async fn wait_ready(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            self.check_alive("becoming ready");
            assert!(
                Instant::now() < deadline,
                "{} not listening on {addr} after {timeout:?}\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the current incarnation's log has a line containing `needle`; returns that line.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .current_log()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned)
            {
                return line;
            }
            self.check_alive(needle);
            assert!(
                Instant::now() < deadline,
                "{}: no log line with {needle:?} after {timeout:?}\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn check_alive(&mut self, doing: &str) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited ({status}) while {doing}\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
    }

    /// Sends SIGTERM and waits up to `deadline` for a clean exit; returns the exit status.
    ///
    /// # Panics
    /// If the process does not exit in time (it is then killed).
    pub async fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        let pid = self.pid().expect("terminate a running process");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let until = Instant::now() + deadline;
        loop {
            let child = self.child.as_mut().expect("a child");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status;
            }
            if Instant::now() >= until {
                self.kill9();
                panic!(
                    "{} did not exit within {deadline:?} of SIGTERM\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: the point is that it is not running afterwards.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The whole log (every incarnation).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The lines written by the current (or last) incarnation.
    pub fn current_log(&self) -> String {
        let text = self.log_text();
        let start = usize::try_from(self.log_start).unwrap_or(0).min(text.len());
        text.get(start..).unwrap_or_default().to_owned()
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The program's name in logs and messages.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}----- end of {} log -----",
                self.name,
                self.log.display(),
                self.log_text(),
                self.name
            );
        }
    }
}
