//! The `cloud-hub` program: runs the hub from a config file, or manages the development PKI.
//! `cloud-hub health --config FILE` probes a running hub's metrics endpoint (container health checks).

use std::error::Error as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_hub::pki;
use meshbridge_broker::embedded::QUIET_RUMQTTD_LOGS;
use tokio_util::sync::CancellationToken;

/// meshbridge cloud hub: accepts edge agents over QUIC + mutual TLS and publishes their messages into the cloud
/// broker under each site's namespace.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Hub config file (same as `cloud-hub run --config FILE`).
    #[arg(long, global = false)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub.
    Run {
        /// Hub config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a hub config (file, `MESHBRIDGE_*` overrides, every rule) without running; exit status 2
    /// and every problem listed when it is not valid.
    CheckConfig {
        /// Hub config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the effective hub config (file, environment overrides, defaults, resolved paths) as TOML,
    /// with passwords redacted.
    PrintConfig {
        /// Hub config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Probe the running hub's metrics endpoint (`metrics.listen`; 0.0.0.0 is probed on 127.0.0.1): exit
    /// status 0 when `GET /metrics` answers 200 within 2 s, else 1 and the reason on standard error. For
    /// container health checks (the images have no shell or curl).
    Health {
        /// Hub config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage the private CA and certificates.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Add factory lines (sites): certificate, hub config entry and the agent's bundle in one step.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Inspect hub configs without running the hub.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Dry run: show which sites and routes NEW adds, removes or alters compared with the current config,
    /// which sites' agents would get a new pushed config, and which changes need a restart. NEW is
    /// validated first, with every problem listed.
    Diff {
        /// The config the hub runs now.
        #[arg(long)]
        config: PathBuf,
        /// The edited config.
        new: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Add site NAME: issue its certificate from the hub's CA (the directory of `tls.ca`), add it to the
    /// hub config (a running hub picks it up within a second) and write a bundle with the agent's config,
    /// certificate, key and CA. On the gateway: `edge-agent bootstrap BUNDLE`.
    Add {
        /// Site name (the certificate's Common Name: the site's identity at the hub).
        name: String,
        /// Hub config file, edited in place (comments kept; the site is appended).
        #[arg(long, default_value = "/etc/meshbridge/hub.toml")]
        config: PathBuf,
        /// The hub as the gateway reaches it, HOST:PORT (default: `listen.quic`, unless it is 0.0.0.0/[::]).
        #[arg(long)]
        hub_address: Option<String>,
        /// Name the agent checks in the hub certificate (default: the certificate's first DNS name or IP).
        #[arg(long)]
        server_name: Option<String>,
        /// Namespace pattern, e.g. "acme/plant1/{site}" (default: the one all existing sites share).
        #[arg(long)]
        namespace: Option<String>,
        /// Validity of the site certificate in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Bundle file to write (mode 0600: it holds the site's private key). Default: NAME.bundle.tar.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing bundle file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a new CA and the hub certificate in DIR (refuses if a CA is already there).
    Init {
        /// Directory for ca.pem, ca.key, hub.pem, hub.key.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address the hub certificate is valid for (repeatable; default: hub.meshbridge.local,
        /// localhost, 127.0.0.1).
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Issue a client certificate for site NAME, signed by the CA in DIR.
    IssueSite {
        /// Site name (becomes the certificate's Common Name: the site's identity at the hub).
        name: String,
        /// Directory holding the CA; the certificate is written there as site-NAME.pem / site-NAME.key.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Issue a new certificate for site NAME in place of its current one (site-NAME.pem / .key in DIR).
    /// The agent presents it from its next connection, without a restart, once the files reach it.
    RenewSite {
        /// Site name.
        name: String,
        /// Directory holding the CA and the site's certificate.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Also revoke the certificate being replaced (a key that may be compromised): the hub closes the
        /// link still using it, and the agent reconnects with the new one.
        #[arg(long)]
        revoke_old: bool,
    },
    /// Revoke site NAME: every certificate issued for it is added to DIR/crl.pem. A hub with
    /// `tls.crl` pointing at that file refuses them and closes their live links within seconds.
    Revoke {
        /// Site name (ignored with --serial).
        name: Option<String>,
        /// Directory holding the CA and crl.pem.
        #[arg(long)]
        dir: PathBuf,
        /// Revoke one certificate by its serial (hex, as `openssl x509 -serial` prints it) instead.
        #[arg(long)]
        serial: Option<String>,
    },
    /// Show the revocation list DIR/crl.pem (writing an empty one, signed by the CA, if there is none).
    Crl {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a TLS server certificate signed by the CA in DIR, e.g. for an edge broker's TLS port; written
    /// as server-FILE.pem / server-FILE.key (replacing an earlier pair of that name).
    IssueServer {
        /// File name part: server-FILE.pem.
        file: String,
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address the certificate is valid for (repeatable; the first is also its CN).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match (cli.command, cli.config) {
        (Some(Command::Pki { command }), None) => return report(pki_command(command)),
        (Some(Command::Site { command }), None) => return report(site_command(command)),
        (Some(Command::Config { command }), None) => return report(config_command(command)),
        (Some(Command::CheckConfig { config }), None) => {
            for note in env_notes() {
                eprintln!("cloud-hub: warning: {note}");
            }
            return match shared::config::load_hub(&config) {
                Ok(cfg) => {
                    println!(
                        "{}: valid ({} site(s), {} route(s), QUIC on {})",
                        config.display(),
                        cfg.sites.len(),
                        cfg.routes.len(),
                        cfg.listen.quic
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("cloud-hub: {error}");
                    ExitCode::from(2)
                }
            };
        }
        (Some(Command::Health { config }), None) => {
            let listen = shared::config::load_hub(&config)
                .map(|cfg| cfg.metrics.listen)
                .map_err(|e| e.to_string());
            return meshbridge_metrics::health_command("cloud-hub", &config, listen);
        }
        (Some(Command::PrintConfig { config }), None) => {
            return match shared::config::load_hub(&config) {
                Ok(cfg) => report(
                    shared::config::redacted_toml(&cfg)
                        .map(|text| print!("{text}"))
                        .map_err(anyhow::Error::from),
                ),
                Err(error) => {
                    eprintln!("cloud-hub: {error}");
                    ExitCode::from(2)
                }
            };
        }
        (Some(Command::Run { config }), None) | (None, Some(config)) => config,
        (Some(_), Some(_)) => {
            eprintln!(
                "error: give --config either before or after `run`, not with another command"
            );
            return ExitCode::from(2);
        }
        (None, None) => {
            eprintln!("error: missing --config FILE (or a subcommand; see --help)");
            return ExitCode::from(2);
        }
    };
    let cfg = match shared::config::load_hub(&config) {
        Ok(cfg) => cfg,
        Err(error) => {
            // Invalid configs list every problem in the error's own text; a cause is printed only when it
            // adds something that text does not already say.
            let text = error.to_string();
            eprintln!("error: {text}");
            let mut source = error.source();
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    eprintln!("  caused by: {cause_text}");
                }
                source = cause.source();
            }
            return ExitCode::from(2);
        }
    };
    report(run_hub(config, cfg))
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Deprecation warnings for the environment's shared-prefix variables the hub reads.
fn env_notes() -> Vec<String> {
    shared::config::deprecated_env(
        shared::config::Program::Hub,
        std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned()),
    )
}

fn site_command(command: SiteCommand) -> anyhow::Result<()> {
    match command {
        SiteCommand::Add {
            name,
            config,
            hub_address,
            server_name,
            namespace,
            days,
            out,
            force,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.bundle.tar")));
            let added = cloud_hub::site::add(&cloud_hub::site::SiteAdd {
                config: &config,
                site: &name,
                hub_address: hub_address.as_deref(),
                server_name: server_name.as_deref(),
                namespace: namespace.as_deref(),
                lifetime: Duration::from_secs(days.saturating_mul(24 * 3600)),
                out: &out,
                overwrite: force,
            })?;
            println!(
                "site {name}: certificate {}, namespace {:?}, added to {}",
                added.cert.display(),
                added.namespace,
                config.display()
            );
            println!(
                "bundle: {} (agent -> {}, server name {}; forwards {} until the hub pushes its routes)",
                added.bundle.display(),
                added.hub,
                added.server_name,
                added.filters.join(", ")
            );
            println!("a running hub admits {name} within a second; on the gateway:");
            println!("  edge-agent bootstrap {}", added.bundle.display());
        }
    }
    Ok(())
}

fn pki_command(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir, names } => {
            let paths = pki::init(&dir, &names)
                .with_context(|| format!("initialising the PKI in {}", dir.display()))?;
            println!(
                "CA:  {} ({})",
                paths.ca_cert.display(),
                paths.ca_key.display()
            );
            println!(
                "hub: {} ({})",
                paths.hub_cert.display(),
                paths.hub_key.display()
            );
        }
        PkiCommand::IssueServer {
            file,
            dir,
            names,
            days,
        } => {
            let lifetime = Duration::from_secs(days.saturating_mul(24 * 3600));
            let paths = pki::issue_server(&dir, &file, &names, lifetime).with_context(|| {
                format!(
                    "issuing a server certificate for {names:?} from {}",
                    dir.display()
                )
            })?;
            println!(
                "server {file}: {} ({})",
                paths.cert.display(),
                paths.key.display()
            );
        }
        PkiCommand::RenewSite {
            name,
            dir,
            days,
            revoke_old,
        } => {
            let lifetime = Duration::from_secs(days.saturating_mul(24 * 3600));
            let (paths, revoked) = pki::renew_site(&dir, &name, lifetime, revoke_old)
                .with_context(|| format!("renewing the certificate of site {name:?}"))?;
            println!(
                "site {name}: {} ({})",
                paths.cert.display(),
                paths.key.display()
            );
            if let Some(serial) = revoked {
                println!("revoked the previous certificate, serial {serial}");
            }
        }
        PkiCommand::Revoke { name, dir, serial } => {
            let now = time::OffsetDateTime::now_utc();
            let (added, already) = match (serial, name) {
                (Some(serial), _) => {
                    let serial = cloud_hub::crl::Serial::from_hex(&serial)?;
                    let added =
                        cloud_hub::crl::revoke_serials(&dir, std::slice::from_ref(&serial), now)
                            .context("revoking the certificate")?;
                    let already = if added.is_empty() {
                        vec![serial]
                    } else {
                        Vec::new()
                    };
                    (added, already)
                }
                (None, Some(name)) => {
                    let site = pki::SiteId::new(&name)
                        .with_context(|| format!("invalid site name {name:?}"))?;
                    cloud_hub::crl::revoke_site(&dir, &site, now)
                        .with_context(|| format!("revoking site {name:?}"))?
                }
                (None, None) => anyhow::bail!("name a site, or give --serial"),
            };
            for serial in &added {
                println!("revoked {serial}");
            }
            for serial in &already {
                println!("already revoked {serial}");
            }
            println!(
                "{}: hubs whose tls.crl is this file refuse these certificates and close their links",
                dir.join(cloud_hub::crl::CRL_FILE).display()
            );
        }
        PkiCommand::Crl { dir } => {
            let path = cloud_hub::crl::ensure(&dir, time::OffsetDateTime::now_utc())
                .context("writing the revocation list")?;
            let crl = cloud_hub::crl::load(&path)?;
            let issued = cloud_hub::crl::issued(&dir)?;
            println!(
                "{}: number {}, {} revoked",
                path.display(),
                crl.revoked.number,
                crl.revoked.serials.len()
            );
            for (serial, at) in &crl.revoked.serials {
                let site = issued
                    .iter()
                    .find(|e| &e.serial == serial)
                    .map_or("?", |e| e.site.as_str());
                let rfc3339 = &time::format_description::well_known::Rfc3339;
                let at = time::OffsetDateTime::from_unix_timestamp(*at)
                    .ok()
                    .and_then(|t| t.format(rfc3339).ok())
                    .unwrap_or_else(|| at.to_string());
                println!("{serial}  site {site}  revoked {at}");
            }
        }
        PkiCommand::IssueSite { name, dir, days } => {
            let lifetime = Duration::from_secs(days.saturating_mul(24 * 3600));
            let paths = pki::issue_site(&dir, &name, lifetime).with_context(|| {
                format!(
                    "issuing a certificate for site {name:?} from {}",
                    dir.display()
                )
            })?;
            println!(
                "site {name}: {} ({})",
                paths.cert.display(),
                paths.key.display()
            );
        }
    }
    Ok(())
}

fn config_command(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Diff { config, new } => {
            let old = shared::config::load_hub(&config)
                .with_context(|| format!("loading the current config {}", config.display()))?;
            let new_cfg = shared::config::load_hub(&new)
                .with_context(|| format!("loading the new config {}", new.display()))?;
            print!("{}", shared::config::HubConfigDiff::between(&old, &new_cfg));
        }
    }
    Ok(())
}

fn run_hub(config: PathBuf, cfg: shared::config::HubConfig) -> anyhow::Result<()> {
    let json = cfg.log_format == shared::config::LogFormat::Json;
    meshbridge_metrics::logging::init(&cfg.log, QUIET_RUMQTTD_LOGS, json)
        .context("invalid log filter (RUST_LOG or `log`)")?;
    for note in env_notes() {
        tracing::warn!("{note}");
    }
    meshbridge_metrics::otel::install("cloud-hub", env!("CARGO_PKG_VERSION"))
        .context("invalid tracing set-up (OTEL_* variables)")?;

    let runtime =
        meshbridge_metrics::runtime(cfg.worker_threads).context("starting the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
        // systemd readiness ("ready" in lib.rs), STOPPING=1 and watchdog pings.
        let _systemd = meshbridge_metrics::systemd::supervise(shutdown.clone());
        let result = cloud_hub::run_reloading(Some(config), cfg, shutdown).await;
        signals.abort();
        result.context("cloud-hub failed")
    })?;
    drop(runtime);
    meshbridge_metrics::otel::shutdown();
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C (SIGINT).
async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(cause = %error, "cannot listen for SIGTERM; only Ctrl-C stops the hub");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
    shutdown.cancel();
}
