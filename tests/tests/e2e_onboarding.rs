//! Issue 13 item 4, a line added in two commands: `cloud-hub site add line3` at the hub (certificate, config
//! entry, bundle) and `edge-agent bootstrap BUNDLE` at the gateway; the new agent then delivers through the
//! hub that was running all along, without a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use meshbridge_tests::bins::{bin, output_text as text, run, CLOUD_HUB, EDGE_AGENT};
use meshbridge_tests::mesh::{prove_path, Mesh};
use meshbridge_tests::mqtt::Collector;
use meshbridge_tests::net::free_tcp;
use meshbridge_tests::process::Proc;
use meshbridge_tests::spec::BrokerSpec;

const WAIT: Duration = Duration::from_secs(20);

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_add_and_bootstrap_bring_a_new_line_onto_a_running_hub() {
    let mesh = Mesh::new(&["line1"]);
    let mut spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    spec.tail.push(
        "[[routes]]\nname = \"telemetry\"\nkind = \"uplink\"\nfrom = \"*\"\nfilter = \"telemetry/#\"\n"
            .to_owned(),
    );
    let mut hub = mesh.start_hub(&spec).await;
    let hub_config = mesh.path().join("hub.toml");
    let bundle = mesh.path().join("line3.bundle.tar");

    // At the hub.
    let out = run(
        CLOUD_HUB,
        &[
            "site",
            "add",
            "line3",
            "--config",
            s(&hub_config),
            "--out",
            s(&bundle),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("edge-agent bootstrap {}", bundle.display())),
        "{}",
        text(&out)
    );
    assert_eq!(mode(&bundle), 0o600, "the bundle holds a private key");
    let listed = shared::config::load_hub(&hub_config).expect("the edited config loads");
    assert!(listed.sites.iter().any(|site| site.name == "line3"));
    // Twice is refused by name, and the config is left as it is.
    let before = std::fs::read_to_string(&hub_config).expect("read");
    let again = run(
        CLOUD_HUB,
        &[
            "site",
            "add",
            "line3",
            "--config",
            s(&hub_config),
            "--out",
            s(&mesh.path().join("other.tar")),
        ],
    );
    assert!(!again.status.success());
    assert!(text(&again).contains("already in"), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(&hub_config).expect("read"), before);

    // At the gateway.
    let etc = mesh.path().join("etc");
    let state = mesh.path().join("line3-state");
    let install = |extra: &[&str]| {
        let mut args = vec![
            "bootstrap",
            s(&bundle),
            "--etc-dir",
            s(&etc),
            "--state-dir",
            s(&state),
        ];
        args.extend_from_slice(extra);
        run(EDGE_AGENT, &args)
    };
    let out = install(&[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("site line3 installed"),
        "{}",
        text(&out)
    );
    let config = etc.join("agent.toml");
    assert_eq!(mode(&etc.join("agent/site.key")), 0o640);
    assert_eq!(mode(&etc.join("agent")), 0o750);
    assert_eq!(mode(&config), 0o640);
    let out = install(&[]);
    assert!(text(&out).contains("unchanged"), "{}", text(&out));
    let check = run(EDGE_AGENT, &["--config", s(&config), "check-config"]);
    assert!(check.status.success(), "{}", text(&check));

    // A bundle for another site does not replace it without --force.
    let out = run(
        CLOUD_HUB,
        &[
            "site",
            "add",
            "line4",
            "--config",
            s(&hub_config),
            "--out",
            s(&mesh.path().join("line4.tar")),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        EDGE_AGENT,
        &[
            "bootstrap",
            s(&mesh.path().join("line4.tar")),
            "--etc-dir",
            s(&etc),
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("exists (site line3); give --force"),
        "{}",
        text(&out)
    );
    // Not a bundle at all.
    let out = run(
        EDGE_AGENT,
        &["bootstrap", s(&hub_config), "--etc-dir", s(&etc)],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not a meshbridge site bundle"),
        "{}",
        text(&out)
    );

    // The installed agent, its local ports moved by the environment (the bundle's are the package's).
    let edge = free_tcp();
    let env = [
        (
            "MESHBRIDGE_AGENT_BROKER__LISTEN".to_owned(),
            edge.to_string(),
        ),
        (
            "MESHBRIDGE_AGENT_METRICS__LISTEN".to_owned(),
            free_tcp().to_string(),
        ),
    ];
    let mut agent = Proc::start_env(
        "line3",
        &bin(EDGE_AGENT),
        &["--config".to_owned(), s(&config).to_owned()],
        &env,
        mesh.path(),
    );
    agent.wait_ready(edge, WAIT).await;
    let BrokerSpec::Embedded { listen: cloud } = spec.broker else {
        unreachable!("embedded above")
    };
    let collector = Collector::start(cloud, "onboarding", &["acme/#"], false).await;
    prove_path(
        edge,
        &collector,
        "telemetry/robot1/temp",
        "acme/plant1/line3/telemetry/robot1/temp",
        WAIT,
    )
    .await;
    // Removing the site from the config closes its live link and refuses it; what its agent accepts in the
    // meantime waits in its queue and arrives once the site is back, without a hub restart either way.
    let with_line3 = std::fs::read_to_string(&hub_config).expect("read");
    let cut = with_line3
        .find("\n# Added by `cloud-hub site add line3`.")
        .expect("the appended entry");
    let line4 = with_line3
        .find("\n# Added by `cloud-hub site add line4`.")
        .expect("the appended entry");
    let without = format!("{}{}", &with_line3[..cut], &with_line3[line4..]);
    std::fs::write(&hub_config, &without).expect("write");
    hub.wait_log("the site was removed from the hub's config", WAIT)
        .await;
    let plan = meshbridge_tests::mqtt::PublishPlan::new("held", "telemetry/held", 3);
    let held = meshbridge_tests::mqtt::Publisher::start(edge, plan)
        .finish()
        .await;
    assert_eq!(
        held.acked_ids().count(),
        3,
        "the edge accepts while the site is out"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !collector
            .received()
            .iter()
            .any(|m| m.topic == "acme/plant1/line3/telemetry/held"),
        "a removed site's messages are not published"
    );
    std::fs::write(&hub_config, &with_line3).expect("write");
    assert!(
        collector
            .wait_until(WAIT, |r| r
                .iter()
                .filter(|m| m.topic == "acme/plant1/line3/telemetry/held")
                .count()
                >= 3)
            .await,
        "the messages held while the site was out arrive once it is back"
    );
    assert!(
        std::fs::read_dir(&state)
            .expect("the agent made its --state-dir")
            .next()
            .is_some(),
        "the agent keeps its state in --state-dir"
    );
    drop(hub);
}
