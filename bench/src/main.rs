//! `meshbridge-bench`: meshbridge, a Mosquitto edge→cloud bridge and one Mosquitto with no bridge (the
//! machine's ceiling), side by side, in one command:
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo run --release -p meshbridge-bench -- [--scenario all|throughput|latency|outage|crash|fanin] [--runs N] [--quick]
//! cargo run --release -p meshbridge-bench -- --scenario sites [--sites 10,100,1000]   # meshbridge only
//! ```
//!
//! Each system is started from scratch for every run, on 127.0.0.1 ephemeral ports, in a temporary
//! directory; publishers (at the edge) and one subscriber (at the cloud) run in this process. Every message
//! carries publisher id, sequence number and send time, so delivery, loss, duplicates, reordering and
//! latency are judged from what the subscriber actually received. CPU and peak RSS of every process come
//! from `/proc`. Tables print medians over `--runs`.
//!
//! # Layout
//! - `procs`: child processes, readiness, SIGTERM/SIGKILL, `/proc` usage.
//! - `systems`: the three systems' configs and start/stop of their edge and cloud sides.
//! - `load`: the subscriber (rumqttc), publishers' start/finish, payload format.
//! - `publisher`: one publisher, a minimal MQTT 3.1.1 QoS 1 client that batches its writes.
//! - `stats`: per-run figures, medians, formatting.
//! - `scenarios`: what each scenario does and which figures it reports.
//! - `sites`: N simulated sites against one hub (issue 10 item 5).

mod load;
mod procs;
mod publisher;
mod scenarios;
mod sites;
mod stats;
mod systems;

use std::time::Instant;

use anyhow::Result;
use clap::{Parser, ValueEnum};

use crate::scenarios::{Scenario, Settings};
use crate::stats::{format, median, Rows};
use crate::systems::{Kind, Programs};

/// Side-by-side benchmark: meshbridge vs a Mosquitto bridge vs one broker (the ceiling).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    scenario: Which,
    /// Runs per system and scenario; tables show medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Shorter durations (a smoke test of the bench itself; figures are noisier).
    #[arg(long)]
    quick: bool,
    /// Only these systems (comma-separated), e.g. `--systems meshbridge` while profiling.
    #[arg(long, value_enum, value_delimiter = ',')]
    systems: Option<Vec<SystemArg>>,
    /// Site counts of the `sites` scenario (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 1000])]
    sites: Vec<usize>,
    /// Run this `edge-agent` instead of the one beside the bench: for A/B runs of two builds, alternated
    /// by the caller (this machine's figures swing ±30 % between runs of one build; see the README).
    #[arg(long)]
    agent_binary: Option<std::path::PathBuf>,
    /// Run this `cloud-hub` instead of the one beside the bench (as `--agent-binary`).
    #[arg(long)]
    hub_binary: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    All,
    Throughput,
    Latency,
    Outage,
    Crash,
    Fanin,
    LocalSession,
    /// N simulated sites against one hub (meshbridge only; not part of `all`).
    Sites,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SystemArg {
    Meshbridge,
    /// meshbridge exporting traces at the default sampling ratio (not in the default set).
    MeshbridgeTraced,
    Mosquitto,
    Ceiling,
}

impl SystemArg {
    fn kind(self) -> Kind {
        match self {
            Self::Meshbridge => Kind::Meshbridge,
            Self::MeshbridgeTraced => Kind::MeshbridgeTraced,
            Self::Mosquitto => Kind::MosquittoBridge,
            Self::Ceiling => Kind::Ceiling,
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let programs = Programs::locate(cli.agent_binary.clone(), cli.hub_binary.clone())?;
    let settings = Settings::new(cli.quick);
    if cli.scenario == Which::Sites {
        print_machine(&programs);
        return run_sites(&programs, &cli).await;
    }
    let scenarios: Vec<Scenario> = match cli.scenario {
        Which::All => Scenario::all(),
        Which::Throughput => vec![Scenario::Throughput(1), Scenario::Throughput(10)],
        Which::Latency => vec![Scenario::Latency],
        Which::Outage => vec![Scenario::Outage],
        Which::Crash => vec![Scenario::Crash],
        Which::Fanin => vec![Scenario::FanIn],
        Which::LocalSession => vec![Scenario::LocalSession],
        Which::Sites => unreachable!("handled above"),
    };
    let chosen: Vec<Kind> = match &cli.systems {
        Some(list) => list.iter().map(|s| s.kind()).collect(),
        None => vec![Kind::Meshbridge, Kind::MosquittoBridge, Kind::Ceiling],
    };
    print_machine(&programs);
    let started = Instant::now();
    let mut summary = Vec::new();
    for scenario in scenarios {
        let kinds: Vec<Kind> = chosen
            .iter()
            .copied()
            .filter(|&k| scenario.applies_to(k))
            .collect();
        // Runs interleave the systems (run 1 of each, then run 2 of each, ...) so that a disturbance on the
        // machine lands on all of them alike.
        let mut runs: Vec<Vec<Rows>> = vec![Vec::with_capacity(cli.runs); kinds.len()];
        for run in 1..=cli.runs {
            for (i, &kind) in kinds.iter().enumerate() {
                eprintln!(
                    "{} · {} · run {run}/{}",
                    scenario.title(),
                    kind.label(),
                    cli.runs
                );
                procs::settle().await;
                // One failed run (a system that did not start, say) is reported and left out of the
                // medians instead of losing every table of the invocation.
                match scenarios::run(scenario, kind, &programs, &settings).await {
                    Ok(rows) => runs[i].push(rows),
                    Err(error) => eprintln!("  run failed, left out of the medians: {error:#}"),
                }
            }
        }
        let columns: Vec<(Kind, Rows)> = kinds
            .iter()
            .zip(&runs)
            .map(|(&kind, runs)| (kind, median(runs)))
            .collect();
        print_table(
            &scenario.title(),
            &scenario.describe(&settings),
            cli.runs,
            &columns,
        );
        summary.push((scenario, columns));
    }
    print_targets(&summary);
    eprintln!("total time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The `sites` scenario: one column per site count, medians of `--runs`.
async fn run_sites(programs: &Programs, cli: &Cli) -> Result<()> {
    let settings = sites::SitesSettings::new(cli.quick);
    let started = Instant::now();
    let mut columns = Vec::new();
    for &n in &cli.sites {
        let mut runs = Vec::with_capacity(cli.runs);
        for run in 1..=cli.runs {
            eprintln!("sites · N = {n} · run {run}/{}", cli.runs);
            procs::settle().await;
            match sites::run(programs, n, &settings).await {
                Ok(rows) => runs.push(rows),
                Err(error) => eprintln!("  run failed, left out of the medians: {error:#}"),
            }
        }
        columns.push((format!("N = {n}"), median(&runs)));
    }
    print_named_table("sites", &settings.describe(), cli.runs, &columns);
    eprintln!("total time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_machine(programs: &Programs) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mosquitto = std::process::Command::new(&programs.mosquitto)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    println!("machine: {model}, {cores} cores; {mosquitto}");
    println!(
        "meshbridge: {} and {}",
        programs.agent.display(),
        programs.hub.display()
    );
}

fn print_table(title: &str, description: &str, runs: usize, columns: &[(Kind, Rows)]) {
    let named: Vec<(String, Rows)> = columns
        .iter()
        .map(|(k, rows)| (k.label().to_owned(), rows.clone()))
        .collect();
    print_named_table(title, description, runs, &named);
}

fn print_named_table(title: &str, description: &str, runs: usize, columns: &[(String, Rows)]) {
    println!();
    println!("### {title}");
    println!("{description}; median of {runs} run(s)");
    println!();
    let header: Vec<&str> = columns.iter().map(|(k, _)| k.as_str()).collect();
    println!("| | {} |", header.join(" | "));
    println!("| --- |{}", " ---: |".repeat(columns.len()));
    let Some((_, first)) = columns.first() else {
        return;
    };
    for row in &first.0 {
        let cells: Vec<String> = columns
            .iter()
            .map(|(_, rows)| {
                let value = rows.0.iter().find(|r| r.name == row.name);
                value.map_or_else(|| "n/a".to_owned(), |r| format(r.value, r.fmt))
            })
            .collect();
        // Rows that apply to no system at all are noise.
        if cells.iter().all(|c| c == "n/a") {
            continue;
        }
        println!("| {} | {} |", row.name, cells.join(" | "));
    }
}

/// Checks issue 10's targets (and the earlier ones on loss, draining and idle memory) against the
/// medians that were measured.
fn print_targets(summary: &[(Scenario, Vec<(Kind, Rows)>)]) {
    let get = |scenario: Scenario, kind: Kind, row: &str| -> Option<f64> {
        summary
            .iter()
            .find(|(s, _)| *s == scenario)?
            .1
            .iter()
            .find(|(k, _)| *k == kind)?
            .1
            .get(row)
    };
    let mut lines = Vec::new();
    let cpu = "CPU per message (all processes)";
    // Issue 10: CPU per message at a factory line's rate and in fan-in, against the Mosquitto pair.
    for s in [Scenario::Latency, Scenario::FanIn] {
        if let (Some(mb), Some(mq)) = (
            get(s, Kind::Meshbridge, cpu),
            get(s, Kind::MosquittoBridge, cpu),
        ) {
            lines.push(check(
                &format!(
                    "{}: CPU/msg ≤ 2.5× the mosquitto pair: {mb:.1} vs {mq:.1} µs ({:.1}×)",
                    s.title(),
                    mb / mq
                ),
                mb <= 2.5 * mq,
            ));
        }
    }
    if let Some(p99) = get(Scenario::Latency, Kind::Meshbridge, "latency p99") {
        lines.push(check(
            &format!("p99 latency at 1,000 msg/s ≤ 2 ms: {:.2} ms", p99 / 1e6),
            p99 <= 2e6,
        ));
    }
    for n in [1, 10] {
        let s = Scenario::Throughput(n);
        let mb = get(s, Kind::Meshbridge, "delivered msg/s");
        if let (Some(mb), Some(mq)) = (mb, get(s, Kind::MosquittoBridge, "delivered msg/s")) {
            lines.push(check(
                &format!(
                    "throughput ({n} pub) ≥ 2× mosquitto bridge: {:.2}×",
                    mb / mq
                ),
                mb >= 2.0 * mq,
            ));
        }
        if let (Some(mb), Some(c)) = (mb, get(s, Kind::Ceiling, "delivered msg/s")) {
            lines.push(check(
                &format!(
                    "throughput ({n} pub) ≥ 90 % of the ceiling: {:.0} %",
                    100.0 * mb / c
                ),
                mb >= 0.9 * c,
            ));
        }
    }
    let ten = Scenario::Throughput(10);
    if let (Some(peak), Some(lost)) = (
        get(ten, Kind::Meshbridge, "cloud peak RSS"),
        get(ten, Kind::Meshbridge, "lost after PUBACK"),
    ) {
        lines.push(check(
            &format!(
                "hub peak RSS (10 pub) ≤ 150 MiB, none lost: {:.1} MiB, lost {lost}",
                peak / 1048576.0
            ),
            peak <= 150.0 * 1048576.0 && lost == 0.0,
        ));
    }
    for s in [Scenario::Outage, Scenario::Crash] {
        let lost = get(s, Kind::Meshbridge, "lost after PUBACK");
        let dups = get(s, Kind::Meshbridge, "duplicates");
        if let (Some(lost), Some(dups)) = (lost, dups) {
            lines.push(check(
                &format!(
                    "{}: zero loss and duplicates: lost {lost}, dup {dups}",
                    s.title()
                ),
                lost == 0.0 && dups == 0.0,
            ));
        }
        if let Some(drain) = get(s, Kind::Meshbridge, "backlog drained after cloud return") {
            lines.push(check(
                &format!("{}: backlog drained within 1 s: {drain:.2} s", s.title()),
                drain <= 1.0,
            ));
        }
    }
    if let Some(idle) = summary
        .iter()
        .filter_map(|(s, _)| get(*s, Kind::Meshbridge, "edge RSS idle"))
        .reduce(f64::max)
    {
        lines.push(check(
            &format!("agent RSS idle < 20 MB: {:.1} MiB", idle / 1048576.0),
            idle < 20e6,
        ));
    }
    if let Some(peak) = get(Scenario::Outage, Kind::Meshbridge, "edge peak RSS") {
        lines.push(format!(
            "- info: agent peak RSS with a 20 s backlog: {:.1} MiB",
            peak / 1048576.0
        ));
    }
    if !lines.is_empty() {
        println!();
        println!("### Targets (meshbridge, from the medians above)");
        for line in lines {
            println!("{line}");
        }
    }
}

fn check(text: &str, ok: bool) -> String {
    format!("- [{}] {text}", if ok { "x" } else { " " })
}
