//! `edge-agent --config FILE`: loads the config, sets up logging and signals, and runs the agent.
//! `edge-agent --config FILE dead-letters list|replay`: the operator's view of messages refused for good.
//! `edge-agent passwd FILE USER`: adds or changes a user of a password file (as `mosquitto_passwd`).
//! `edge-agent --config FILE check-config | print-config`: validates the config, or prints the effective one.

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
    let Some(config) = cli.config else {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config FILE is required",
            )
            .exit();
    };
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
    match serve(cfg) {
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

fn serve(cfg: shared::config::AgentConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = edge_agent::run(cfg, shutdown).await;
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
