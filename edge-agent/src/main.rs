//! `edge-agent --config FILE`: loads the config, sets up logging and signals, and runs the agent.
//! `edge-agent --config FILE dead-letters list|replay`: the operator's view of messages refused for good.

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
    /// Messages refused for good (by the cloud broker, or too large for the path).
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
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
