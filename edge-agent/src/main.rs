//! `edge-agent --config FILE`: loads the config, sets up logging and signals, and runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use meshbridge_broker::embedded::QUIET_RUMQTTD_LOGS;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// meshbridge edge agent: forwards a site's MQTT messages to the cloud hub, store-and-forward.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Agent config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match shared::config::load_agent(&cli.config) {
        Ok(cfg) => cfg,
        Err(error) => {
            eprintln!("edge-agent: {error}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&cfg.log))
        .add_directive_list();
    tracing_subscriber::fmt().with_env_filter(filter).init();
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("edge-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Adds [`QUIET_RUMQTTD_LOGS`] to a filter.
trait AddDirectives {
    fn add_directive_list(self) -> Self;
}

impl AddDirectives for EnvFilter {
    fn add_directive_list(self) -> Self {
        QUIET_RUMQTTD_LOGS
            .split(',')
            .filter_map(|d| d.parse().ok())
            .fold(self, Self::add_directive)
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
