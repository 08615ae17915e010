//! Issue 11, items 2 and 3 at the edge broker, with Mosquitto's own command-line clients: a password file
//! written by `edge-agent passwd` (Mosquitto's format), topic ACLs in Mosquitto's `acl_file` format, and
//! both reloaded while the agent runs.
//!
//! - the right password connects, a wrong one and an anonymous client are refused;
//! - `robot5` may publish `telemetry/robot5/#` only: that reaches the cloud, `telemetry/robot6/temp` is
//!   answered 0x87 (MQTT 5) and reaches nobody;
//! - a subscription outside the ACL is refused in the SUBACK (0x87), one inside is granted;
//! - a user added with `edge-agent passwd` while the agent runs can log in within seconds.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, EDGE_AGENT};
use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::mosquitto::{client_tool, clients_skip};
use meshbridge_tests::mqtt::Collector;
use meshbridge_tests::spec::BrokerSpec;

const WAIT: Duration = Duration::from_secs(20);

const ACL: &str = "\
# No anonymous clients: the password file is required.
user robot5
topic write telemetry/robot5/#
user viewer
topic read telemetry/robot5/#
";

/// `edge-agent passwd FILE USER --password PW` (few iterations: the test checks the format, not the cost).
fn passwd(file: &Path, user: &str, password: &str) {
    let out = std::process::Command::new(bin(EDGE_AGENT))
        .args([
            "passwd",
            &file.to_string_lossy(),
            user,
            "--password",
            password,
        ])
        .args(["--iterations", "1000"])
        .output()
        .expect("run edge-agent passwd");
    assert!(out.status.success(), "edge-agent passwd: {out:?}");
}

/// Runs `mosquitto_pub` (MQTT 5, QoS 1) against `port` with `args`.
async fn mosquitto_pub(port: u16, args: &[&str]) -> Output {
    let program = client_tool("mosquitto_pub").expect("mosquitto_pub is installed");
    let port = port.to_string();
    let mut all = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-d",
    ];
    all.extend_from_slice(args);
    tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(program).args(&all).output(),
    )
    .await
    .expect("mosquitto_pub ends")
    .expect("mosquitto_pub runs")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_acls_at_the_edge_broker_with_mosquitto_clients() {
    if clients_skip("passwords_and_acls_at_the_edge_broker_with_mosquitto_clients") {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let password_file = mesh.path().join("passwd");
    let acl_file = mesh.path().join("acl");
    passwd(&password_file, "robot5", "robot5-secret");
    passwd(&password_file, "viewer", "viewer-secret");
    let stored = std::fs::read_to_string(&password_file).expect("read");
    assert!(
        stored.starts_with("robot5:$7$1000$") && !stored.contains("robot5-secret"),
        "salted hashes in Mosquitto's format, no plaintext: {stored}"
    );
    std::fs::write(&acl_file, ACL).expect("write the ACL");

    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    spec.broker_extra = vec![
        format!("password_file = {:?}", password_file.display().to_string()),
        format!("acl_file = {:?}", acl_file.display().to_string()),
    ];
    let agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr().port();
    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud", &["acme/#"], false).await;

    // Denied first, allowed second: once the allowed one arrived, the denied one never will.
    let denied = mosquitto_pub(
        edge,
        &[
            "-u",
            "robot5",
            "-P",
            "robot5-secret",
            "-t",
            "telemetry/robot6/temp",
            "-m",
            "6",
        ],
    )
    .await;
    assert!(
        text(&denied).contains("rc135") || text(&denied).contains("Not authorized"),
        "the denied publish is answered 0x87: {}",
        text(&denied)
    );
    let allowed = mosquitto_pub(
        edge,
        &[
            "-u",
            "robot5",
            "-P",
            "robot5-secret",
            "-t",
            "telemetry/robot5/temp",
            "-m",
            "5",
        ],
    )
    .await;
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(
        cloud
            .wait_until(WAIT, |r| r
                .iter()
                .any(|m| m.topic.ends_with("telemetry/robot5/temp")))
            .await,
        "the allowed message did not reach the cloud"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !cloud
            .received()
            .iter()
            .any(|m| m.topic.ends_with("telemetry/robot6/temp")),
        "a message the ACL denied reached the cloud"
    );

    // Wrong password, unknown user, anonymous: refused at CONNECT.
    for args in [
        vec!["-u", "robot5", "-P", "wrong"],
        vec!["-u", "nobody", "-P", "robot5-secret"],
        vec![],
    ] {
        let mut all = args.clone();
        all.extend(["-t", "telemetry/robot5/temp", "-m", "x"]);
        let out = mosquitto_pub(edge, &all).await;
        assert!(!out.status.success(), "{args:?} was let in: {}", text(&out));
    }

    // Subscriptions: inside the viewer's read grant, granted; outside, refused in the SUBACK.
    let sub = client_tool("mosquitto_sub").expect("installed");
    let port = edge.to_string();
    let run_sub = |user: &'static str, password: &'static str, filter: &'static str| {
        let (sub, port) = (sub.clone(), port.clone());
        async move {
            tokio::time::timeout(
                WAIT,
                tokio::process::Command::new(sub)
                    .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-d"])
                    .args(["-u", user, "-P", password, "-t", filter, "-W", "2"])
                    .output(),
            )
            .await
            .expect("mosquitto_sub ends")
            .expect("mosquitto_sub runs")
        }
    };
    let refused = run_sub("viewer", "viewer-secret", "telemetry/#").await;
    assert!(
        text(&refused).contains("denied") || text(&refused).contains("135"),
        "a filter wider than the grant is refused: {}",
        text(&refused)
    );
    let granted = run_sub("viewer", "viewer-secret", "telemetry/robot5/#").await;
    assert!(
        text(&granted).contains("received SUBACK") && !text(&granted).contains("denied"),
        "a filter inside the grant is granted: {}",
        text(&granted)
    );

    // A persistent 3.1.1 session (served from the front's own store): the same rule, SUBACK 0x80.
    let persistent = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(&sub)
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311", "-d"])
            .args(["-c", "-i", "viewer-persistent", "-q", "1"])
            .args([
                "-u",
                "viewer",
                "-P",
                "viewer-secret",
                "-t",
                "telemetry/#",
                "-W",
                "2",
            ])
            .output(),
    )
    .await
    .expect("mosquitto_sub ends")
    .expect("mosquitto_sub runs");
    assert!(
        text(&persistent).contains("denied") || text(&persistent).contains("128"),
        "a persistent session's filter wider than the grant is refused: {}",
        text(&persistent)
    );

    // A user added while the agent runs can log in once the file is re-read.
    passwd(&password_file, "robot7", "robot7-secret");
    let deadline = Instant::now() + WAIT;
    loop {
        // robot7 has no grant: the connection is accepted and the publish answered 0x87.
        let out = mosquitto_pub(
            edge,
            &[
                "-u",
                "robot7",
                "-P",
                "robot7-secret",
                "-t",
                "telemetry/robot7/t",
                "-m",
                "7",
            ],
        )
        .await;
        if text(&out).contains("received CONNACK (0)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new user was not accepted after the file changed: {}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = agent.log_text();
    assert!(log.contains("password file reloaded"), "{log}");
    assert!(log.contains("PUBLISH denied by the ACL"), "{log}");
}
