//! SIGHUP (`systemctl reload`): what the agent can take without a restart, it already follows; SIGHUP
//! makes it look now and say what it did.
//!
//! - The broker's password and ACL files are re-read at once (the broker's watcher also wakes on SIGHUP;
//!   otherwise it polls every 2 s); a file that changed and parses is in force, one with errors is logged
//!   and the running copy stays.
//! - TLS certificates (the site certificate towards the hub, the broker's TLS ports) are re-read at the
//!   next handshake after their files change; nothing to do.
//! - Routes come from the hub (`ConfigPush`), never from the file once pushed.
//! - A changed `log` directive is put in force at once (unless `RUST_LOG` is set, which wins).
//! - Every other key of the config file is wired at start: the file is read again and compared with the
//!   running config, and the keys that differ are logged as needing a restart. A file that no longer
//!   loads is logged with every problem, so a restart is not attempted blind.

use std::future::Future;
use std::path::PathBuf;

use shared::config::{AgentConfig, BrokerConfig};
use tracing::{info, warn};

/// Listens for SIGHUP now (so a SIGHUP that comes before the returned future is first polled is not
/// fatal) and returns the future that answers each one until dropped. `running` is the config in force.
///
/// # Errors
/// When the signal handler cannot be installed.
pub fn follow(
    config: PathBuf,
    mut running: AgentConfig,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(async move {
        while hangup.recv().await.is_some() {
            answer(&config, &mut running);
        }
    })
}

/// One SIGHUP: applies a changed `log`, logs what is followed and what in the file would need a restart.
fn answer(config: &std::path::Path, running: &mut AgentConfig) {
    let followed = followed_files(running);
    info!(
        files = %followed.join(", "),
        "SIGHUP: password and ACL files (if any) re-read now, TLS certificates at the next handshake after they change; routes come from the hub"
    );
    match shared::config::load_agent(config) {
        Err(error) => warn!(
            config = %config.display(),
            cause = %error,
            "SIGHUP: the config file does not load; the running config stays, and a restart would fail"
        ),
        Ok(new) => {
            if new.log != running.log && apply_log(&new.log) {
                running.log.clone_from(&new.log);
            }
            let keys = changed_keys(running, &new);
            if keys.is_empty() {
                info!(config = %config.display(), "SIGHUP: the config file is as running");
            } else {
                warn!(
                    config = %config.display(),
                    keys = %keys.join(", "),
                    "SIGHUP: the config file differs from the running config; these keys take effect at the next restart"
                );
            }
        }
    }
}

/// Puts a changed `log` in force (`meshbridge_metrics::logging::reload`); whether it did.
fn apply_log(log: &str) -> bool {
    use meshbridge_metrics::logging::{reload, Reloaded};
    match reload(log, meshbridge_broker::embedded::QUIET_RUMQTTD_LOGS) {
        Ok(Reloaded::Applied(filter)) => {
            info!(%filter, "SIGHUP: log filter now in force");
            true
        }
        Ok(Reloaded::RustLogWins) => {
            info!(
                "SIGHUP: RUST_LOG is set and stays in force; `log` applies at a start without it"
            );
            true
        }
        Err(e) => {
            warn!(cause = %e, "SIGHUP: cannot apply the new log filter; the one in force stays");
            false
        }
    }
}

/// The files the running agent re-reads when they change, for the log.
fn followed_files(cfg: &AgentConfig) -> Vec<String> {
    let mut files = vec![
        cfg.uplink.cert.display().to_string(),
        cfg.uplink.key.display().to_string(),
    ];
    if let BrokerConfig::Embedded(broker) = &cfg.broker {
        files.extend(broker.password_file.iter().map(|p| p.display().to_string()));
        files.extend(broker.acl_file.iter().map(|p| p.display().to_string()));
        let tls = broker
            .tls
            .iter()
            .chain(broker.listeners.iter().filter_map(|l| l.tls.as_ref()));
        for tls in tls {
            files.push(tls.cert.display().to_string());
            files.push(tls.key.display().to_string());
        }
    }
    files
}

/// The keys (`uplink.hub`, `broker`, ...) whose values differ between `a` and `b`, one level into tables.
/// `routes` is left out: the file's routes are the bootstrap ones, replaced by the hub's pushed config.
fn changed_keys(a: &AgentConfig, b: &AgentConfig) -> Vec<String> {
    if a == b {
        return Vec::new();
    }
    let (Ok(toml::Value::Table(a)), Ok(toml::Value::Table(b))) =
        (toml::Value::try_from(a), toml::Value::try_from(b))
    else {
        return vec!["(cannot compare)".to_owned()];
    };
    let mut keys = Vec::new();
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for name in names {
        if name == "routes" {
            continue;
        }
        match (a.get(name), b.get(name)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let inner: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.extend(
                    inner
                        .into_iter()
                        .filter(|k| x.get(*k) != y.get(*k))
                        .map(|k| format!("{name}.{k}")),
                );
            }
            (x, y) if x != y => keys.push(name.clone()),
            _ => {}
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, extra: &str) -> AgentConfig {
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "site = \"line3\"\ndata_dir = \"state\"\n{extra}\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:1883\"\n\
                 [uplink]\nhub = \"127.0.0.1:4433\"\nserver_name = \"localhost\"\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\
                 [[routes]]\nfilter = \"telemetry/#\"\n"
            ),
        )
        .expect("write");
        shared::config::load_agent(&path).expect("valid")
    }

    #[test]
    fn changed_keys_name_what_differs_and_skip_routes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = config(dir.path(), "");
        assert!(changed_keys(&a, &a.clone()).is_empty());
        let mut b = a.clone();
        b.log = "debug".to_owned();
        b.uplink.server_name = "hub.example".to_owned();
        b.routes.clear();
        assert_eq!(changed_keys(&a, &b), ["log", "uplink.server_name"]);
        let c = config(dir.path(), "agent_name = \"a\"");
        assert_eq!(changed_keys(&a, &c), ["agent_name"]);
    }
}
