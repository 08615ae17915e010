//! Authentication and topic ACLs for the front's clients (issue 11), from a password file and an ACL
//! file in Mosquitto's formats (`shared::auth`), both reloaded when they change on disk.
//!
//! A client with a user name must present that user's password; one without is anonymous, let in only if
//! the listener allows anonymous clients. With an ACL file, each PUBLISH and each SUBSCRIBE filter is
//! checked against it (see `shared/src/auth/acl.rs`); without one, an admitted client may do anything.
//!
//! Reload: the files are polled every [`RELOAD_EVERY`]; a changed file that parses replaces the running
//! copy (logged at info), one that does not is refused with every bad line logged and the running copy
//! stays (as a config reload does). Sessions already connected keep their login; their next PUBLISH or
//! SUBSCRIBE is checked against the new ACL.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use shared::auth::acl::{Acl, Client};
use shared::auth::passwd::Passwords;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Password checks running at once: each is ~60 ms of CPU on purpose, and a burst of wrong passwords
/// must not take every core.
const CONCURRENT_CHECKS: usize = 2;

/// Why the files cannot be used at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// A file has lines that cannot be used (all listed).
    #[error("{path}: {}", errors.join("; "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One entry per bad line.
        errors: Vec<String>,
    },
}

/// A file kept parsed, with what it looked like when read.
#[derive(Debug)]
struct Watched<T> {
    path: PathBuf,
    current: RwLock<Arc<T>>,
    stamp: std::sync::Mutex<Option<(SystemTime, u64)>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl<T> Watched<T> {
    fn load(
        path: &Path,
        parse: impl Fn(&str) -> Result<T, Vec<String>>,
    ) -> Result<Self, AuthError> {
        let before = stamp(path);
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parsed = parse(&text).map_err(|errors| AuthError::Invalid {
            path: path.to_path_buf(),
            errors,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(parsed)),
            stamp: std::sync::Mutex::new(before),
        })
    }

    fn get(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the file if it changed; returns whether a new copy is in force.
    fn refresh(&self, what: &str, parse: impl Fn(&str) -> Result<T, Vec<String>>) -> bool {
        let now = stamp(&self.path);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                warn!(path = %self.path.display(), cause = %e, "cannot read the changed {what}; the running one stays");
                return false;
            }
        };
        match parse(&text) {
            Ok(parsed) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(parsed);
                info!(path = %self.path.display(), "{what} reloaded");
                true
            }
            Err(errors) => {
                warn!(path = %self.path.display(), errors = %errors.join("; "), "the changed {what} has errors; the running one stays");
                false
            }
        }
    }
}

fn parse_passwords(text: &str) -> Result<Passwords, Vec<String>> {
    Passwords::parse(text).map_err(|e| e.into_iter().map(|e| e.to_string()).collect())
}

fn parse_acl(text: &str) -> Result<Acl, Vec<String>> {
    Acl::parse(text).map_err(|e| e.into_iter().map(|e| e.to_string()).collect())
}

/// Counts of what was refused, for the programs' metrics.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// CONNECTs refused: wrong or missing credentials, or anonymous where not allowed.
    pub logins_refused: AtomicU64,
    /// PUBLISHes the ACL denied.
    pub publish_denied: AtomicU64,
    /// SUBSCRIBE filters the ACL denied.
    pub subscribe_denied: AtomicU64,
}

/// The files every listener of a broker shares.
#[derive(Debug)]
struct Files {
    passwords: Option<Watched<Passwords>>,
    acl: Option<Watched<Acl>>,
    checks: Semaphore,
    counters: Arc<AuthCounters>,
}

/// One listener's rules: the broker's files, and whether anonymous clients are let in there.
#[derive(Debug, Clone)]
pub struct Auth {
    files: Arc<Files>,
    allow_anonymous: bool,
}

/// The outcome of a CONNECT's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// Let in as this user (`None`: anonymous).
    Admitted(Option<String>),
    /// Refused: wrong user or password, or anonymous (no user name, or no password file to check one
    /// against) where that is not allowed.
    Refused,
}

impl Auth {
    /// Reads the files (either may be absent); refusals are counted in `counters` (the program's
    /// metrics read them).
    ///
    /// # Errors
    /// [`AuthError`] if a file cannot be read or has bad lines.
    pub fn load(
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
        allow_anonymous: bool,
        counters: Arc<AuthCounters>,
    ) -> Result<Self, AuthError> {
        Ok(Self {
            files: Arc::new(Files {
                passwords: password_file
                    .map(|p| Watched::load(p, parse_passwords))
                    .transpose()?,
                acl: acl_file.map(|p| Watched::load(p, parse_acl)).transpose()?,
                checks: Semaphore::new(CONCURRENT_CHECKS),
                counters,
            }),
            allow_anonymous,
        })
    }

    /// The same files (users, ACL, counters) for another listener, with its own anonymous rule.
    #[must_use]
    pub fn for_listener(&self, allow_anonymous: bool) -> Self {
        Self {
            files: Arc::clone(&self.files),
            allow_anonymous,
        }
    }

    /// What was refused, on every listener sharing these files.
    #[must_use]
    pub fn counters(&self) -> &AuthCounters {
        &self.files.counters
    }

    /// Polls the files every [`RELOAD_EVERY`], and at once on SIGHUP (`systemctl reload`), until `stop`
    /// (once per broker: the listeners share them).
    pub async fn reload_loop(self: Arc<Self>, stop: CancellationToken) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => drop(h.recv().await),
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RELOAD_EVERY) => {}
                () = hup => {}
            }
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(p) = &me.files.passwords {
                    p.refresh("password file", parse_passwords);
                }
                if let Some(a) = &me.files.acl {
                    a.refresh("ACL file", parse_acl);
                }
            })
            .await;
        }
    }

    /// Checks a CONNECT's user name and password (each `None` when absent). Slow when a password is
    /// checked (see `shared::auth::passwd`): runs on the blocking pool, a few at a time. A client that
    /// presented a verified certificate on a listener that requires them is `cert_user` (its Common
    /// Name), whatever its CONNECT says, as Mosquitto's `use_identity_as_username`.
    pub async fn login(
        &self,
        cert_user: Option<&str>,
        username: Option<&[u8]>,
        password: Option<&[u8]>,
    ) -> Login {
        if let Some(user) = cert_user {
            return Login::Admitted(Some(user.to_owned()));
        }
        let login = match (username, &self.files.passwords) {
            // Without a password file a user name proves nothing: the client is anonymous (Mosquitto
            // would trust the name for its ACL; a client could then claim any user's rights).
            (None, _) | (Some(_), None) if self.allow_anonymous => Login::Admitted(None),
            (None, _) | (Some(_), None) => Login::Refused,
            (Some(user), Some(passwords)) => {
                let Ok(user) = std::str::from_utf8(user) else {
                    return self.refused();
                };
                let (user, password) = (user.to_owned(), password.unwrap_or_default().to_vec());
                let passwords = passwords.get();
                let Ok(_permit) = self.files.checks.acquire().await else {
                    return self.refused();
                };
                let check = tokio::task::spawn_blocking(move || {
                    passwords.verify(&user, &password).then_some(user)
                })
                .await;
                match check {
                    Ok(Some(user)) => Login::Admitted(Some(user)),
                    _ => Login::Refused,
                }
            }
        };
        if login == Login::Refused {
            return self.refused();
        }
        login
    }

    fn refused(&self) -> Login {
        self.files
            .counters
            .logins_refused
            .fetch_add(1, Ordering::Relaxed);
        Login::Refused
    }

    /// Whether the ACL (if any) lets `client` publish to `topic`; a denial is counted.
    pub fn can_publish(&self, client: Client<'_>, topic: &str) -> bool {
        self.decide(
            |acl| acl.can_publish(client, topic),
            &self.files.counters.publish_denied,
        )
    }

    /// Whether the ACL (if any) lets `client` subscribe to `filter`; a denial is counted.
    pub fn can_subscribe(&self, client: Client<'_>, filter: &str) -> bool {
        self.decide(
            |acl| acl.can_subscribe(client, filter),
            &self.files.counters.subscribe_denied,
        )
    }

    /// The ACL's answer (`true` without an ACL), counting a denial in `denied`.
    fn decide(&self, ask: impl FnOnce(&Acl) -> bool, denied: &AtomicU64) -> bool {
        let Some(acl) = &self.files.acl else {
            return true;
        };
        let ok = ask(&acl.get());
        if !ok {
            denied.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Whether anonymous clients are let in on this listener.
    #[must_use]
    pub const fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Whether an ACL is configured (every PUBLISH and SUBSCRIBE is then checked).
    #[must_use]
    pub fn has_acl(&self) -> bool {
        self.files.acl.is_some()
    }
}
