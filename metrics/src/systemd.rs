//! systemd's service notification protocol (`sd_notify(3)`), for units with `Type=notify` and
//! `WatchdogSec=`: `READY=1` once a program serves, `STOPPING=1` when it begins to shut down, and
//! `WATCHDOG=1` every half `WATCHDOG_USEC`.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace). That is a dozen lines over `std`'s `UnixDatagram`, so there is no
//! crate for it (and no `unsafe`, which the workspace denies). Without `NOTIFY_SOCKET` (not under
//! systemd, or a unit of another `Type=`) every function here does nothing.
//!
//! The watchdog pings come from a task on the program's own runtime ([`supervise`]): a runtime whose
//! workers are all stuck stops pinging, and systemd then kills and restarts the program.

use std::ffi::OsString;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Where notifications go, and how often the watchdog wants a ping; read once from the environment.
#[derive(Debug, Clone)]
pub struct Notifier {
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

/// Why a notification could not be sent (logged by the caller; never fatal).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is not a usable socket address (empty, too long, or not absolute).
    #[error("NOTIFY_SOCKET={value:?} is not a usable socket address")]
    Address {
        /// The variable's value.
        value: OsString,
        /// Why it was refused.
        #[source]
        source: std::io::Error,
    },
    /// The datagram could not be sent (no listener at the address, or its queue is full).
    #[error("cannot notify systemd")]
    Send(#[source] std::io::Error),
}

impl Notifier {
    /// The notifier for this process's environment: `None` without `NOTIFY_SOCKET`.
    ///
    /// # Errors
    /// [`NotifyError::Address`] when `NOTIFY_SOCKET` is set but unusable.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        Self::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// [`Self::from_env`] from the variables' values, for process `pid`. The watchdog is on when
    /// `WATCHDOG_USEC` is a positive number and `WATCHDOG_PID` is unset or `pid` (systemd sets it to the
    /// main process, so a child that inherited the environment does not ping for it).
    ///
    /// # Errors
    /// As [`Self::from_env`].
    pub fn from_vars(
        notify_socket: Option<OsString>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Result<Option<Self>, NotifyError> {
        let Some(value) = notify_socket.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let addr = socket_addr(&value).map_err(|source| NotifyError::Address { value, source })?;
        let for_us = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>() == Ok(pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(|u| Duration::from_micros(u) / 2);
        Ok(Some(Self { addr, watchdog }))
    }

    /// How often [`supervise`] pings: half of `WATCHDOG_USEC`, `None` when the unit has no watchdog.
    #[must_use]
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines) in one datagram. Never blocks: a full queue
    /// at systemd is an error, not a stall of the caller's runtime.
    ///
    /// # Errors
    /// [`NotifyError::Send`].
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let socket = UnixDatagram::unbound().map_err(NotifyError::Send)?;
        socket.set_nonblocking(true).map_err(NotifyError::Send)?;
        socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(NotifyError::Send)?;
        Ok(())
    }
}

/// The address `NOTIFY_SOCKET` names: a filesystem path, or `@name` in Linux's abstract namespace.
fn socket_addr(value: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    #[cfg(target_os = "linux")]
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name);
    }
    if !bytes.starts_with(b"/") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither an absolute path nor @abstract",
        ));
    }
    SocketAddr::from_pathname(std::path::Path::new(value))
}

/// Sends `state` if the program runs under a `Type=notify` unit; problems are logged at warn.
fn send(state: &str) {
    match Notifier::from_env() {
        Ok(Some(notifier)) => {
            if let Err(error) = notifier.notify(state) {
                warn!(cause = %chain(&error), state, "cannot tell systemd");
            }
        }
        Ok(None) => {}
        Err(error) => warn!(cause = %chain(&error), "cannot tell systemd"),
    }
}

/// The error and its cause, in one line.
fn chain(error: &NotifyError) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// Tells systemd the program serves (`READY=1`, with `status` as the unit's `STATUS=` line, shown by
/// `systemctl status`). Call where the program logs "ready"; again later is harmless.
pub fn ready(status: &str) {
    let status = status.replace('\n', " ");
    send(&format!("READY=1\nSTATUS={status}"));
}

/// Tells systemd the program is shutting down (`STOPPING=1`).
pub fn stopping() {
    send("STOPPING=1\nSTATUS=shutting down");
}

/// The supervision task of [`supervise`]; aborted when dropped.
#[derive(Debug)]
pub struct Supervision(Option<JoinHandle<()>>);

impl Drop for Supervision {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Spawns, on the current runtime, the task that pings the watchdog every [`Notifier::watchdog_interval`]
/// and sends `STOPPING=1` once `shutdown` is cancelled (it keeps pinging while the program drains). Does
/// nothing without `NOTIFY_SOCKET`. Keep the returned value alive as long as the program runs.
///
/// # Panics
/// Outside a tokio runtime.
#[must_use = "the task stops when this is dropped"]
pub fn supervise(shutdown: CancellationToken) -> Supervision {
    let notifier = match Notifier::from_env() {
        Ok(Some(notifier)) => notifier,
        Ok(None) => return Supervision(None),
        Err(error) => {
            warn!(cause = %chain(&error), "cannot tell systemd; no readiness or watchdog notifications");
            return Supervision(None);
        }
    };
    if let Some(every) = notifier.watchdog_interval() {
        info!(every = ?every, "systemd watchdog: pinging");
    }
    Supervision(Some(tokio::spawn(run(notifier, shutdown))))
}

async fn run(notifier: Notifier, shutdown: CancellationToken) {
    let mut tick = notifier.watchdog_interval().map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut stopping_sent = false;
    loop {
        let ping = async {
            match tick.as_mut() {
                Some(tick) => {
                    tick.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled(), if !stopping_sent => {
                stopping_sent = true;
                if let Err(error) = notifier.notify("STOPPING=1\nSTATUS=shutting down") {
                    warn!(cause = %chain(&error), "cannot tell systemd the program is stopping");
                }
            }
            () = ping => {
                if let Err(error) = notifier.notify("WATCHDOG=1") {
                    warn!(cause = %chain(&error), "cannot ping the systemd watchdog");
                } else {
                    debug!("systemd watchdog pinged");
                }
            }
        }
        if stopping_sent && tick.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket standing in for systemd's, and a notifier for it.
    fn listener(watchdog_usec: Option<&str>) -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let notifier = Notifier::from_vars(Some(path.into_os_string()), watchdog_usec, None, 1)
            .expect("a valid address")
            .expect("a notifier");
        (dir, socket, notifier)
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification within 5 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn unset_or_empty_socket_means_no_notifier() {
        assert!(Notifier::from_vars(None, Some("1000"), None, 1)
            .expect("fine")
            .is_none());
        assert!(Notifier::from_vars(Some(OsString::new()), None, None, 1)
            .expect("fine")
            .is_none());
    }

    #[test]
    fn relative_socket_path_is_refused() {
        let refused = Notifier::from_vars(Some("run/notify".into()), None, None, 1);
        assert!(matches!(refused, Err(NotifyError::Address { .. })));
    }

    #[test]
    fn watchdog_interval_is_half_the_usec_and_only_for_the_named_pid() {
        let table: &[(Option<&str>, Option<&str>, Option<Duration>)] = &[
            (None, None, None),
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (Some("30000000"), Some("7"), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("8"), None),
            (Some("0"), None, None),
            (Some("soon"), None, None),
        ];
        for &(usec, pid, want) in table {
            let n = Notifier::from_vars(Some("/run/notify".into()), usec, pid, 7)
                .expect("valid")
                .expect("some");
            assert_eq!(n.watchdog_interval(), want, "usec {usec:?} pid {pid:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_names_are_reached() {
        let name = format!("meshbridge-notify-test-{}", std::process::id());
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name")
        };
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let n = Notifier::from_vars(Some(format!("@{name}").into()), None, None, 1)
            .expect("valid")
            .expect("some");
        n.notify("READY=1").expect("sent");
        assert_eq!(recv(&socket), "READY=1");
    }

    #[test]
    fn notify_reaches_a_real_datagram_socket() {
        let (_dir, socket, notifier) = listener(None);
        notifier.notify("READY=1\nSTATUS=serving").expect("sent");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=serving");
    }

    #[test]
    fn a_missing_listener_is_an_error_not_a_stall() {
        let (dir, socket, notifier) = listener(None);
        drop(socket);
        std::fs::remove_file(dir.path().join("notify")).expect("remove the socket");
        assert!(matches!(
            notifier.notify("READY=1"),
            Err(NotifyError::Send(_))
        ));
    }

    #[tokio::test]
    async fn the_task_pings_the_watchdog_and_says_stopping_on_shutdown() {
        // 200 ms: a ping every 100 ms.
        let (_dir, socket, notifier) = listener(Some("200000"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(notifier, shutdown.clone()));
        let socket = std::sync::Arc::new(socket);
        let read = |socket: std::sync::Arc<UnixDatagram>| async move {
            tokio::task::spawn_blocking(move || recv(&socket))
                .await
                .expect("reader")
        };
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(read(std::sync::Arc::clone(&socket)).await, "WATCHDOG=1");
        }
        // The first ping is at once, the next two 100 ms apart.
        assert!(started.elapsed() >= Duration::from_millis(150));
        shutdown.cancel();
        let mut seen = Vec::new();
        while !seen.iter().any(|s: &String| s.starts_with("STOPPING=1")) {
            seen.push(read(std::sync::Arc::clone(&socket)).await);
            assert!(seen.len() < 10, "no STOPPING=1 in {seen:?}");
        }
        // Still pinging while the program drains.
        assert_eq!(read(std::sync::Arc::clone(&socket)).await, "WATCHDOG=1");
        task.abort();
    }
}
