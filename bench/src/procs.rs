//! Child processes of a benchmark run (brokers, agent, hub): start, wait until ready, stop with SIGTERM,
//! kill with SIGKILL, and read what they cost from `/proc`.
//!
//! CPU is `utime + stime` of `/proc/PID/stat` and memory is `VmHWM` (peak resident set) of
//! `/proc/PID/status`, read while the process is still alive: a process that is stopped and restarted
//! during a scenario has its instances summed (CPU) or maxed (peak RSS).

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// Kernel clock ticks per second for `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on every Linux
/// architecture this runs on).
const CLOCK_TICKS: f64 = 100.0;

/// How long a process may take to become ready (its TCP port accepting).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What one process cost, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// User + system CPU seconds.
    pub(crate) cpu_s: f64,
    /// Peak resident set (VmHWM), bytes.
    pub(crate) peak_rss: u64,
}

impl Usage {
    /// CPU added, peak maxed: the usage of two instances of one role.
    pub(crate) fn merge(self, other: Self) -> Self {
        Self {
            cpu_s: self.cpu_s + other.cpu_s,
            peak_rss: self.peak_rss.max(other.peak_rss),
        }
    }
}

/// Reads the usage of a live process; `None` once it is gone.
pub(crate) fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Usage {
        cpu_s: (utime + stime) as f64 / CLOCK_TICKS,
        peak_rss: status_kib(pid, "VmHWM:")? * 1024,
    })
}

/// Current resident set of a live process, bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    Some(status_kib(pid, "VmRSS:")? * 1024)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The usage of the bench process itself (publishers and subscriber).
pub(crate) fn own_usage() -> Usage {
    usage(std::process::id()).unwrap_or_default()
}

/// How to start one program; kept so that it can be restarted identically.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// Short name for logs and errors (`agent`, `hub`, `mosquitto-edge`).
    pub(crate) name: &'static str,
    /// Executable.
    pub(crate) program: PathBuf,
    /// Arguments.
    pub(crate) args: Vec<String>,
    /// TCP address that accepts connections once the program is ready.
    pub(crate) ready_tcp: SocketAddr,
    /// UDP address the program binds last, if any (the hub's QUIC endpoint).
    pub(crate) ready_udp: Option<SocketAddr>,
    /// Where stdout and stderr go (appended, so restarts keep earlier output).
    pub(crate) log: PathBuf,
    /// Environment variables set for the program (the OTEL_* of the traced system).
    pub(crate) env: Vec<(String, String)>,
}

/// One running program plus the usage of its earlier (stopped) instances.
#[derive(Debug)]
pub(crate) struct Proc {
    spec: Spec,
    child: Option<Child>,
    pid: u32,
    /// Usage of instances that were stopped or killed.
    past: Usage,
    /// Usage at the last [`Proc::mark`] (to report the measurement window only).
    mark: Usage,
}

impl Proc {
    /// Starts the program and waits until it is ready.
    pub(crate) async fn start(spec: Spec) -> Result<Self> {
        let mut proc = Self {
            spec,
            child: None,
            pid: 0,
            past: Usage::default(),
            mark: Usage::default(),
        };
        proc.restart().await?;
        Ok(proc)
    }

    /// Starts a new instance (after [`Proc::stop`] or [`Proc::kill`]).
    pub(crate) async fn restart(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        let mut command = Command::new(&self.spec.program);
        // The configs written by the bench are the whole configuration: no overrides from this shell.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESHBRIDGE_") {
                command.env_remove(key);
            }
        }
        let child = command
            .args(&self.spec.args)
            .env_remove("RUST_LOG")
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.spec.program.display()))?;
        self.pid = child.id().context("child has no pid")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} exited during startup ({status}); see {}:\n{}",
                        self.spec.name,
                        self.spec.log.display(),
                        tail(&self.spec.log)
                    );
                }
            }
            let tcp = TcpStream::connect_timeout(&self.spec.ready_tcp, Duration::from_millis(100))
                .is_ok();
            let udp = self
                .spec
                .ready_udp
                .is_none_or(|addr| UdpSocket::bind(addr).is_err());
            if tcp && udp {
                // A port someone else holds looks ready too: the child must still be running.
                if let Some(status) = self
                    .child
                    .as_mut()
                    .map(Child::try_wait)
                    .transpose()?
                    .flatten()
                {
                    bail!(
                        "{} exited during startup ({status}) although its ports answer (taken by \
                         another process?); see {}:\n{}",
                        self.spec.name,
                        self.spec.log.display(),
                        tail(&self.spec.log)
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {READY_TIMEOUT:?}; see {}:\n{}",
                    self.spec.name,
                    self.spec.log.display(),
                    tail(&self.spec.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Pid of the current instance.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Total usage so far: earlier instances plus the live one.
    pub(crate) fn usage(&self) -> Usage {
        let live = if self.child.is_some() {
            usage(self.pid).unwrap_or_default()
        } else {
            Usage::default()
        };
        self.past.merge(live)
    }

    /// Starts the measurement window: [`Proc::window_usage`] reports CPU from now on.
    pub(crate) fn mark(&mut self) {
        self.mark = self.usage();
    }

    /// CPU since [`Proc::mark`]; the peak RSS is over the whole life.
    pub(crate) fn window_usage(&self) -> Usage {
        let now = self.usage();
        Usage {
            cpu_s: (now.cpu_s - self.mark.cpu_s).max(0.0),
            peak_rss: now.peak_rss,
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL after a deadline). Usage is sampled just before.
    pub(crate) async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.past = self.past.merge(usage(self.pid).unwrap_or_default());
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid);
        }
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "  warning: {} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it",
                self.spec.name
            );
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGKILL (no chance to save anything) and reap. Usage is sampled just before.
    pub(crate) async fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        self.past = self.past.merge(usage(self.pid).unwrap_or_default());
        child.kill().await?;
        Ok(())
    }
}

/// Last lines of a log file, for error messages.
pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Dirty and under-writeback page cache below which the disk counts as settled, KiB.
const SETTLED_DIRTY_KIB: u64 = 8 * 1024;
/// Longest wait for the disk to settle before a run starts anyway.
const SETTLE_MAX: Duration = Duration::from_secs(30);
/// Quiet time after the disk settled, before a run starts.
const SETTLE_PAUSE: Duration = Duration::from_secs(1);

/// Waits until the machine's disk is done with what earlier runs left behind, so that each run starts
/// from the same state. A throughput run writes gigabytes, and its data directory is deleted when it
/// ends; on a file system mounted with `discard` (this machine's is), that deletion and the writeback
/// still run during the next run and slow its `fdatasync`s, which only meshbridge calls on its hot path.
/// Measured here: the latency scenario's CPU per message was 179–204 µs right after a throughput run and
/// 147–185 µs after a quiet pause. `sync` waits for the writeback; the dirty count is checked after it
/// because a process still running (the bench's own) may dirty pages again.
pub(crate) async fn settle() {
    match Command::new("sync").status().await {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("  settle: sync exited with {status}"),
        Err(error) => eprintln!("  settle: could not run sync: {error}"),
    }
    let deadline = Instant::now() + SETTLE_MAX;
    while Instant::now() < deadline {
        match dirty_kib() {
            Some(kib) if kib > SETTLED_DIRTY_KIB => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => break,
        }
    }
    tokio::time::sleep(SETTLE_PAUSE).await;
}

/// `Dirty` + `Writeback` of `/proc/meminfo`, KiB.
fn dirty_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|line| line.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(field("Dirty:")? + field("Writeback:")?)
}
