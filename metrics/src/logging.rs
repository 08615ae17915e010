//! The log set-up both programs share, so they read `RUST_LOG` the same way and speak the same formats.
//!
//! - `RUST_LOG`, when set and not empty, decides alone; an invalid value is an error at start-up (a typo
//!   must not silently fall back to another level).
//! - Otherwise the config's `log` directive, plus the program's own quieting directives (rumqttd's noisy
//!   targets), applies.
//! - `log_format = "json"` writes one JSON object per line (timestamp, level, target, fields, spans) for log
//!   collectors; `text`, the default, writes human-readable lines.
//! - The filter can be replaced while the program runs ([`reload`]: a changed `log` on `systemctl reload`
//!   or a hub config reload); `RUST_LOG`, when set, still wins. The format cannot (a restart).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

pub use tracing_subscriber::filter::ParseError;

/// The filter in force: `RUST_LOG` if set, else `config` with `quiet` appended (both comma-separated).
///
/// # Errors
/// [`ParseError`] if the directives do not parse.
pub fn filter(rust_log: Option<&str>, config: &str, quiet: &str) -> Result<EnvFilter, ParseError> {
    match rust_log.filter(|d| !d.trim().is_empty()) {
        Some(directives) => EnvFilter::try_new(directives),
        None if quiet.is_empty() => EnvFilter::try_new(config),
        None => EnvFilter::try_new(format!("{config},{quiet}")),
    }
}

/// Installs the global subscriber: [`filter`] of the environment's `RUST_LOG`, in `json` or text lines on
/// standard output.
///
/// # Errors
/// [`ParseError`] for invalid directives.
pub fn init(config: &str, quiet: &str, json: bool) -> Result<(), ParseError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(rust_log.as_deref(), config, quiet)?;
    // When standard output is gone (the reader of a pipe died: a log shipper, or `deploy/local/run.sh`
    // killed with its prefixers), tracing-subscriber reports each failed write with `eprintln!`, which
    // panics once standard error is gone too: a panic in whatever task logged, and a shutdown that then
    // never finished. A program with nowhere to log keeps running and stopping as usual instead.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    if json {
        let builder = builder.json().with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    }
    Ok(())
}

/// Replaces the filter of the subscriber [`init`] installed.
type Reloader = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static RELOAD: OnceLock<Reloader> = OnceLock::new();

/// What [`reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The filter in force now (the config's `log` with the quiet directives).
    Applied(String),
    /// `RUST_LOG` is set: it stays in force, whatever the config says.
    RustLogWins,
}

/// Why [`reload`] could not apply a new `log`.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The directives do not parse (the config rules check `log` as text only).
    #[error("invalid log filter")]
    Parse(#[from] ParseError),
    /// [`init`] did not run in this process.
    #[error("no log subscriber of ours is installed")]
    NotInstalled,
    /// The subscriber refused the new filter.
    #[error("cannot replace the log filter: {0}")]
    Failed(String),
}

/// Puts a changed `log` directive in force without a restart, unless `RUST_LOG` decides.
///
/// # Errors
/// [`ReloadError`]; the filter in force then stays.
pub fn reload(config: &str, quiet: &str) -> Result<Reloaded, ReloadError> {
    if std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty()) {
        return Ok(Reloaded::RustLogWins);
    }
    let new = filter(None, config, quiet)?;
    let text = new.to_string();
    let apply = RELOAD.get().ok_or(ReloadError::NotInstalled)?;
    apply(new).map_err(ReloadError::Failed)?;
    Ok(Reloaded::Applied(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_wins_and_must_parse_and_the_config_gets_the_quiet_directives() {
        let from_config = filter(None, "debug", "rumqttd=warn").expect("valid");
        assert_eq!(from_config.to_string(), "rumqttd=warn,debug");
        let empty_env = filter(Some("  "), "info", "").expect("valid");
        assert_eq!(empty_env.to_string(), "info");
        let env = filter(Some("trace"), "info", "rumqttd=warn").expect("valid");
        assert_eq!(env.to_string(), "trace", "RUST_LOG alone decides");
        assert!(
            filter(Some("info,a=[[["), "info", "").is_err(),
            "a typo is an error"
        );
    }
}
