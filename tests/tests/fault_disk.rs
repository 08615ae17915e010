//! Disk faults under a running agent (fault scenarios 7 and 8 of issue 7's suite):
//!
//! - **fsync fails** (`fiu-run` from Debian's `fiu-utils` makes `fdatasync` fail at random while the agent
//!   takes messages): a failed commit is never acknowledged to its publisher, it is logged, the agent
//!   keeps running (no crash loop) and takes messages again once the disk behaves; everything it did
//!   acknowledge arrives.
//! - **the disk fills** (the agent's data directory on a small tmpfs, the hub down so the queue grows):
//!   new messages are refused, nothing committed is lost, and once space is freed the agent takes
//!   messages again without a restart.
//!
//! Both print one line per scenario: sent, acknowledged, delivered, lost, unexpected, duplicates.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, EDGE_AGENT};
use meshbridge_tests::faults::FaultMesh;
use meshbridge_tests::mesh::{restart, wait_ready, STOP_TIMEOUT};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishOutcome, PublishPlan, Publisher, Report};
use meshbridge_tests::prereq;
use meshbridge_tests::process::Proc;
use meshbridge_tests::spec::BrokerSpec;
use meshbridge_tests::tmpfs::{fill, Tmpfs};

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// Waits for every acknowledged message, then reports (and prints the scenario line).
async fn settle(cloud: &Collector, outcomes: &[&PublishOutcome], scenario: &str) -> Report {
    let expected: BTreeSet<MsgId> = outcomes.iter().flat_map(|o| o.acked_ids()).collect();
    let arrived = cloud.wait_for_all(&expected, Duration::from_secs(60)).await;
    cloud
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .await;
    let report = Report::new(outcomes, &cloud.received());
    let sent: usize = outcomes
        .iter()
        .map(|o| o.acked.len() + o.unconfirmed.len() + o.refused.len())
        .sum();
    let unexpected = cloud
        .received()
        .iter()
        .filter_map(|r| r.msg_id())
        .filter(|id| outcomes.iter().any(|o| o.name == id.publisher))
        .filter(|id| {
            !outcomes.iter().any(|o| {
                o.name == id.publisher
                    && (o.acked.contains(&id.n)
                        || o.unconfirmed.contains(&id.n)
                        || o.refused.contains(&id.n))
            })
        })
        .count();
    println!(
        "scenario={scenario} sent={sent} acknowledged={} delivered={} lost={} unexpected={unexpected} duplicates={}",
        expected.len(),
        report.distinct,
        report.lost.len(),
        report.duplicates_by_id
    );
    assert!(arrived, "{scenario}: {report}");
    report.assert_no_loss();
    assert_eq!(unexpected, 0, "{scenario}: delivered but never sent");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_fsyncs_are_never_acknowledged_and_do_not_stop_the_agent() {
    let test = "failing_fsyncs_are_never_acknowledged_and_do_not_stop_the_agent";
    let (Some(fiu_run), Some(fiu_ctrl)) = (which("fiu-run"), which("fiu-ctrl")) else {
        assert!(prereq::missing(
            test,
            false,
            "fiu-run/fiu-ctrl are not installed",
            "scripts/install-test-deps.sh installs Debian's fiu-utils"
        ));
        return;
    };
    let FaultMesh {
        mesh,
        cloud_broker: _cloud_broker,
        cloud,
        hub_spec,
        hub: _hub,
    } = FaultMesh::start("line1").await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let config = spec.write(&mesh.path().join("line1.toml"));
    // fiu-run sets LD_PRELOAD and execs the agent: same process, with libc's fdatasync under control.
    let mut agent = Proc::start_args(
        "line1",
        &fiu_run,
        &[
            "-x".to_owned(),
            bin(EDGE_AGENT).to_string_lossy().into_owned(),
            "--config".to_owned(),
            config.to_string_lossy().into_owned(),
        ],
        mesh.path(),
    );
    wait_ready(&mut agent, &spec.broker).await;
    let pid = agent.pid().expect("agent pid").to_string();

    let mut plan = PublishPlan::new("pub", "telemetry/fsync", 1_500).rate(300);
    plan.deadline = Duration::from_secs(60);
    let publisher = Publisher::start(spec.broker.client_addr(), plan);
    publisher.wait_acked(300, Duration::from_secs(20)).await;
    let fault = |action: &str| {
        let status = Command::new(&fiu_ctrl)
            .args(["-c", action, &pid])
            .status()
            .expect("run fiu-ctrl");
        assert!(status.success(), "fiu-ctrl -c {action} {pid}");
    };
    fault("enable_random name=posix/io/sync/fdatasync,probability=0.5");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    fault("disable name=posix/io/sync/fdatasync");
    let at_heal = publisher.acked();
    let outcome = publisher.finish().await;

    assert!(agent.is_running(), "the agent survived failing fsyncs");
    let log = agent.log_text();
    let failed_commits = log
        .lines()
        .filter(|l| l.contains("commit") && (l.contains("ERROR") || l.contains("WARN")))
        .count();
    assert!(
        failed_commits > 0 && outcome.acked.len() < 1_500,
        "the fault took effect: failed commits were logged and some publishes were not acknowledged \
         ({failed_commits} log lines, {} acked of 1500)\n{log}",
        outcome.acked.len()
    );
    assert!(
        outcome.acked.len() > at_heal as usize,
        "the agent took messages again after the disk healed: {outcome:?}"
    );
    settle(&cloud, &[&outcome], "fsync-failures").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_messages_loses_nothing_and_recovers_without_restart() {
    let test = "a_full_disk_refuses_new_messages_loses_nothing_and_recovers_without_restart";
    if prereq::needs_root(test, "mount a tmpfs for the agent's data directory") {
        return;
    }
    let fs = Tmpfs::mount("24m").expect("mount a tmpfs as root");
    let FaultMesh {
        mesh,
        cloud_broker: _cloud_broker,
        cloud,
        hub_spec,
        mut hub,
    } = FaultMesh::start("line1").await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    spec.data_dir = fs.dir.join("line1");
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();

    // The hub goes away, so the queue only grows; the ballast leaves ~3 MiB for it.
    assert!(hub.terminate(STOP_TIMEOUT).await.success());
    fill(&fs.dir.join("ballast"), (24 << 20) - (3 << 20));

    // More than fits; once the disk is full every publish is refused, so the deadline ends the run.
    let mut plan = PublishPlan::new("fill", "telemetry/disk", 4_000);
    plan.pad = 2_000;
    plan.deadline = Duration::from_secs(12);
    let filled = Publisher::start(edge, plan).finish().await;
    let not_acked = filled.refused.len() + filled.unconfirmed.len() + filled.unsent as usize;
    assert!(
        not_acked > 0 && !filled.acked.is_empty(),
        "the disk filled part-way: {} acknowledged, {not_acked} not",
        filled.acked.len()
    );
    assert!(agent.is_running(), "the agent survives a full disk");
    assert!(
        agent.log_text().to_lowercase().contains("disk full"),
        "the full disk is logged:\n{}",
        agent.log_text()
    );

    // Space comes back: the same agent process takes messages again.
    std::fs::remove_file(fs.dir.join("ballast")).expect("remove ballast");
    let started = Instant::now();
    let mut after = PublishPlan::new("after", "telemetry/disk", 200);
    after.deadline = Duration::from_secs(30);
    let after = Publisher::start(edge, after).finish().await;
    assert_eq!(
        after.acked.len(),
        200,
        "accepted again without a restart after {:?}: {after:?}",
        started.elapsed()
    );

    restart(&mut hub, &hub_spec.broker).await;
    settle(&cloud, &[&filled, &after], "disk-full").await;
}
