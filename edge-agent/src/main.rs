//! `edge-agent --config FILE`: loads the config, sets up logging and signals, and runs the agent.
//! `edge-agent --config FILE dead-letters list|replay`: the operator's view of messages refused for good.
//! `edge-agent bootstrap BUNDLE`: installs a site bundle from `cloud-hub site add` under /etc/meshbridge.
//! `edge-agent passwd FILE USER`: adds or changes a user of a password file (as `mosquitto_passwd`).
//! `edge-agent --config FILE check-config | print-config`: validates the config, or prints the effective one.
//! `edge-agent --config FILE health`: probes the running agent's metrics endpoint (container health checks).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use meshbridge_broker::embedded::QUIET_RUMQTTD_LOGS;
use tokio_util::sync::CancellationToken;

/// meshbridge edge agent: forwards a site's MQTT messages to the cloud hub, store-and-forward.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Agent config file (TOML). Required; global so it may follow a subcommand too.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Check the config (file, `MESHBRIDGE_*` overrides, every rule) without running; exit status 2 and
    /// every problem listed when it is not valid.
    CheckConfig,
    /// Print the effective config (file, environment overrides, defaults, resolved paths) as TOML, with
    /// passwords redacted.
    PrintConfig,
    /// Probe the running agent's metrics endpoint (`metrics.listen`; 0.0.0.0 is probed on 127.0.0.1):
    /// exit status 0 when `GET /metrics` answers 200 within 2 s, else 1 and the reason on standard error.
    /// For container health checks (the images have no shell or curl).
    Health,
    /// Messages refused for good (by the cloud broker, or too large for the path).
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Add or change a user in a password file (Mosquitto's format, salted PBKDF2-SHA512; the file is
    /// created if missing). The password is read from standard input (one line) unless --password is
    /// given. A running agent picks the change up within seconds.
    Passwd {
        /// The password file (`broker.password_file`).
        file: PathBuf,
        /// The user name.
        user: String,
        /// The password (visible in the process list and shell history; prefer standard input).
        #[arg(long, conflicts_with = "delete")]
        password: Option<String>,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
        /// PBKDF2 iterations (slower to check, slower to guess).
        #[arg(long, default_value_t = shared::auth::passwd::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
    /// Install a site bundle made by `cloud-hub site add NAME` on this gateway: the agent's config as
    /// ETC_DIR/agent.toml and its CA, certificate and key in ETC_DIR/agent/ (key and config readable by
    /// the `meshbridge` group only). The config is checked before anything is replaced. Then start it:
    /// `systemctl enable --now meshbridge-edge-agent` (or restart it).
    Bootstrap {
        /// The bundle file (NAME.bundle.tar).
        bundle: PathBuf,
        /// Config directory.
        #[arg(long, default_value = "/etc/meshbridge")]
        etc_dir: PathBuf,
        /// State directory written into the config as data_dir (default: the bundle's,
        /// /var/lib/meshbridge/agent).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Replace an installed config of another site or hub.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
enum DeadLettersCommand {
    /// List them, oldest first.
    List,
    /// Publish them again to the site's broker (after fixing the cause); each is removed once acknowledged.
    Replay {
        /// Only these letter ids (repeatable).
        #[arg(long = "id")]
        ids: Vec<u64>,
        /// Every letter (required when no --id is given, so a bare `replay` does not resend everything).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Passwd {
        file,
        user,
        password,
        delete,
        iterations,
    }) = cli.command
    {
        return match passwd(&file, &user, password, delete, iterations) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("edge-agent: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Bootstrap {
        bundle,
        etc_dir,
        state_dir,
        force,
    }) = &cli.command
    {
        return bootstrap(bundle, etc_dir, state_dir.as_deref(), *force);
    }
    let Some(config) = cli.config else {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config FILE is required",
            )
            .exit();
    };
    if let Some(Command::Health) = cli.command {
        let listen = shared::config::load_agent(&config)
            .map(|cfg| cfg.metrics.listen)
            .map_err(|e| e.to_string());
        return meshbridge_metrics::health_command("edge-agent", &config, listen);
    }
    let cfg = match shared::config::load_agent(&config) {
        Ok(cfg) => cfg,
        Err(error) => {
            eprintln!("edge-agent: {error}");
            return ExitCode::from(2);
        }
    };
    let env_notes = shared::config::deprecated_env(
        shared::config::Program::Agent,
        std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned()),
    );
    match cli.command {
        Some(Command::CheckConfig) => {
            for note in &env_notes {
                eprintln!("edge-agent: warning: {note}");
            }
            println!(
                "{}: valid (site {}, {} broker, uplink to {}, {} local route(s))",
                config.display(),
                cfg.site,
                match cfg.broker {
                    shared::config::BrokerConfig::Embedded(_) => "embedded",
                    shared::config::BrokerConfig::External(_) => "external",
                },
                cfg.uplink.hub,
                cfg.routes.len()
            );
            return ExitCode::SUCCESS;
        }
        Some(Command::PrintConfig) => {
            return match shared::config::redacted_toml(&cfg) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("edge-agent: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    if let Some(Command::DeadLetters(command)) = cli.command {
        return match dead_letters(&cfg, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("edge-agent: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let json = cfg.log_format == shared::config::LogFormat::Json;
    if let Err(error) = meshbridge_metrics::logging::init(&cfg.log, QUIET_RUMQTTD_LOGS, json) {
        eprintln!("edge-agent: invalid log filter (RUST_LOG or `log`): {error}");
        return ExitCode::from(2);
    }
    for note in &env_notes {
        tracing::warn!("{note}");
    }
    if let Err(error) = meshbridge_metrics::otel::install("edge-agent", env!("CARGO_PKG_VERSION")) {
        eprintln!("edge-agent: invalid tracing set-up (OTEL_* variables): {error}");
        return ExitCode::from(2);
    }
    match serve(config, cfg) {
        Ok(()) => {
            meshbridge_metrics::otel::shutdown();
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("edge-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `edge-agent passwd`: writes the file atomically (a running agent never reads half of it), owner-only.
fn bootstrap(
    bundle: &std::path::Path,
    etc_dir: &std::path::Path,
    state_dir: Option<&std::path::Path>,
    force: bool,
) -> ExitCode {
    let request = edge_agent::bootstrap::Bootstrap {
        bundle,
        etc_dir,
        state_dir,
        force,
    };
    match edge_agent::bootstrap::install(&request) {
        Ok(done) => {
            let what = if done.unchanged {
                "already installed, unchanged"
            } else if done.replaced {
                "installed, replacing the previous config"
            } else {
                "installed"
            };
            println!(
                "site {} {what}: {} (hub {}, state in {})",
                done.site,
                done.config.display(),
                done.hub,
                done.data_dir.display()
            );
            println!(
                "start it: systemctl enable --now meshbridge-edge-agent (or restart it if it runs)"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("edge-agent: {:#}", anyhow::Error::from(error));
            ExitCode::FAILURE
        }
    }
}

fn passwd(
    file: &std::path::Path,
    user: &str,
    password: Option<String>,
    delete: bool,
    iterations: u32,
) -> anyhow::Result<()> {
    use shared::auth::passwd;
    passwd::check_user(user).map_err(anyhow::Error::msg)?;
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !delete => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    if let Err(errors) = passwd::Passwords::parse(&text) {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("{} has errors: {}", file.display(), lines.join("; "));
    }
    let new = if delete {
        passwd::remove_user(&text, user)
            .with_context(|| format!("{} has no user {user:?}", file.display()))?
    } else {
        let password = match password {
            Some(p) => p,
            None => {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("cannot read the password from standard input")?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            }
        };
        anyhow::ensure!(!password.is_empty(), "empty password");
        let iterations =
            std::num::NonZeroU32::new(iterations).context("--iterations must be at least 1")?;
        let mut salt = [0u8; passwd::SALT_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| anyhow::anyhow!("no randomness for the salt"))?;
        passwd::set_user(
            &text,
            user,
            &passwd::hash_password(password.as_bytes(), &salt, iterations),
        )
    };
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("passwd")
    ));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file).with_context(|| format!("cannot replace {}", file.display()))?;
    println!(
        "{} user {user:?} in {}",
        if delete { "removed" } else { "set" },
        file.display()
    );
    Ok(())
}

fn dead_letters(
    cfg: &shared::config::AgentConfig,
    command: DeadLettersCommand,
) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List => {
            let letters =
                edge_agent::dead_letters::list(cfg).context("cannot list dead letters")?;
            println!("{} dead letter(s)", letters.len());
            for l in letters {
                let (topic, bytes) = l
                    .envelope
                    .as_ref()
                    .map_or(("?".to_owned(), 0), |e| (e.topic.clone(), e.payload.len()));
                let (lane, seq) = shared::link::lane::split_dead_letter_seq(l.letter.letter.seq);
                println!(
                    "id={} lane={lane} seq={seq} at_ms={} reason={:#04x} topic={topic:?} payload_bytes={bytes} detail={:?}",
                    l.letter.id, l.letter.at_ms, l.letter.letter.reason_code, l.letter.letter.detail
                );
            }
            Ok(())
        }
        DeadLettersCommand::Replay { ids, all } => {
            anyhow::ensure!(
                all || !ids.is_empty(),
                "say which letters: --id N (repeatable) or --all"
            );
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
            let done = runtime
                .block_on(edge_agent::dead_letters::replay(cfg, &ids))
                .context("replay failed")?;
            println!(
                "replayed {} letter(s): {:?}",
                done.replayed.len(),
                done.replayed
            );
            for (id, why) in &done.refused {
                println!("refused again, kept: id={id} {why}");
            }
            anyhow::ensure!(
                done.refused.is_empty(),
                "{} letter(s) refused again",
                done.refused.len()
            );
            Ok(())
        }
    }
}

fn serve(config: PathBuf, cfg: shared::config::AgentConfig) -> anyhow::Result<()> {
    let runtime = meshbridge_metrics::runtime(cfg.worker_threads)
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
        // SIGHUP (`systemctl reload`) would otherwise kill the agent; systemd readiness and watchdog.
        let hangup =
            edge_agent::hangup::follow(config, cfg.clone()).context("cannot listen for SIGHUP")?;
        let hangup = tokio::spawn(hangup);
        let _systemd = meshbridge_metrics::systemd::supervise(shutdown.clone());
        let result = edge_agent::run(cfg, shutdown).await;
        hangup.abort();
        signals.abort();
        result.context("edge-agent failed")
    })
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C (SIGINT).
async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
