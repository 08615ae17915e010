//! Issue 11, items 2 and 3 at the edge broker, with Mosquitto's own command-line clients: a password file
//! written by `edge-agent passwd` (Mosquitto's format), topic ACLs in Mosquitto's `acl_file` format, and
//! both reloaded while the agent runs.
//!
//! - the right password connects, a wrong one and an anonymous client are refused;
//! - `robot5` may publish `telemetry/robot5/#` only: that reaches the cloud, `telemetry/robot6/temp` is
//!   answered 0x87 (MQTT 5) and reaches nobody;
//! - a subscription outside the ACL is refused in the SUBACK (0x87), one inside is granted;
//! - a user added with `edge-agent passwd` while the agent runs can log in within seconds;
//! - the hub's embedded cloud broker takes the same files, and the hub counts its refusals.

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

/// `mosquitto_pub` as `user` to `topic`.
async fn publish_as(port: u16, user: &str, password: &str, topic: &str) -> Output {
    mosquitto_pub(port, &["-u", user, "-P", password, "-t", topic, "-m", "x"]).await
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
    spec.metrics = Some(meshbridge_tests::net::free_tcp());
    let agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr().port();
    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud", &["acme/#"], false).await;

    // Denied first, allowed second: once the allowed one arrived, the denied one never will.
    let denied = publish_as(edge, "robot5", "robot5-secret", "telemetry/robot6/temp").await;
    assert!(
        text(&denied).contains("rc135") || text(&denied).contains("Not authorized"),
        "the denied publish is answered 0x87: {}",
        text(&denied)
    );
    let allowed = publish_as(edge, "robot5", "robot5-secret", "telemetry/robot5/temp").await;
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
        let out = publish_as(edge, "robot7", "robot7-secret", "telemetry/robot7/t").await;
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

    // Counted, as logged: three refused logins above (wrong password, unknown user, anonymous; the
    // retries before robot7's user existed add more), at least the robot6 and robot7 publishes, and the
    // two subscriptions wider than the grant.
    let body = meshbridge_tests::metrics::scrape(spec.metrics.expect("set")).await;
    let sample = |series: &str| meshbridge_tests::metrics::sample(&body, series);
    assert!(
        sample("meshbridge_mqtt_logins_refused_total") >= Some(3),
        "{body}"
    );
    assert!(
        sample("meshbridge_acl_denied_total{action=\"publish\"}") >= Some(2),
        "{body}"
    );
    assert!(
        sample("meshbridge_acl_denied_total{action=\"subscribe\"}") >= Some(2),
        "{body}"
    );
}

/// Issue 11, item 1: several ports on one edge broker, as a plant runs them (the shipped line1 config's
/// shape): plaintext and anonymous on loopback for local tools, TLS with a required user, and TLS with
/// client certificates whose Common Name is the user name. Users and ACL are shared; the certificate is
/// replaced while the agent runs and the next handshake uses the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ports_with_users_and_client_certificates() {
    if clients_skip("tls_ports_with_users_and_client_certificates") {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let password_file = mesh.path().join("passwd");
    let acl_file = mesh.path().join("acl");
    passwd(&password_file, "robot5", "robot5-secret");
    std::fs::write(
        &acl_file,
        "topic write telemetry/anon/#\nuser robot5\ntopic write telemetry/robot5/#\nuser line1\ntopic write telemetry/cert/#\n",
    )
    .expect("write the ACL");
    let server = mesh.pki.server(&["localhost", "127.0.0.1"], "edge");
    let client = mesh.pki.site("line1");
    let ca = mesh.pki.ca().display().to_string();

    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let (tls_port, cert_port) = (
        meshbridge_tests::net::free_tcp(),
        meshbridge_tests::net::free_tcp(),
    );
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    spec.broker_extra = vec![
        format!("password_file = {}", q(&password_file)),
        format!("acl_file = {}", q(&acl_file)),
        "allow_anonymous = true".to_owned(),
        format!(
            "[[broker.listeners]]\nlisten = \"{tls_port}\"\nallow_anonymous = false\ntls = {{ cert = {}, key = {} }}",
            q(&server.cert),
            q(&server.key)
        ),
        format!(
            "[[broker.listeners]]\nlisten = \"{cert_port}\"\ntls = {{ cert = {}, key = {}, client_ca = {:?} }}",
            q(&server.cert),
            q(&server.key),
            ca
        ),
    ];
    let agent = mesh.start_agent("line1", &spec).await;
    let plain = spec.broker.client_addr().port();
    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud", &["acme/#"], false).await;

    // TLS with a user: verified against the CA, for the name localhost.
    let tls = tls_port.port();
    let user = [
        "-h",
        "localhost",
        "--cafile",
        &ca,
        "-u",
        "robot5",
        "-P",
        "robot5-secret",
    ];
    reaches(&cloud, tls, &user, "telemetry/robot5/tls").await;
    // No user on that port: refused. A plaintext client on the TLS port: no CONNACK.
    let out = mosquitto_pub(
        tls,
        &[
            "-h",
            "localhost",
            "--cafile",
            &ca,
            "-t",
            "telemetry/anon/x",
            "-m",
            "1",
        ],
    )
    .await;
    assert!(
        !out.status.success(),
        "anonymous on the TLS port: {}",
        text(&out)
    );
    let out = mosquitto_pub(tls, &["-t", "telemetry/anon/x", "-m", "1"]).await;
    assert!(
        !out.status.success(),
        "plaintext on the TLS port: {}",
        text(&out)
    );
    // The plaintext loopback port stays open to anonymous local tools (the ACL's anonymous lines).
    reaches(&cloud, plain, &[], "telemetry/anon/plain").await;

    // Client certificates: the CN (line1) is the user, no password; without one the handshake fails.
    let certs = [
        "-h",
        "localhost",
        "--cafile",
        &ca,
        "--cert",
        &client.cert.display().to_string(),
        "--key",
        &client.key.display().to_string(),
    ]
    .map(str::to_owned);
    let certs: Vec<&str> = certs.iter().map(String::as_str).collect();
    reaches(&cloud, cert_port.port(), &certs, "telemetry/cert/x").await;
    let out = mosquitto_pub(
        cert_port.port(),
        &[
            "-h",
            "localhost",
            "--cafile",
            &ca,
            "-u",
            "robot5",
            "-P",
            "robot5-secret",
            "-t",
            "telemetry/robot5/y",
            "-m",
            "1",
        ],
    )
    .await;
    assert!(
        !out.status.success(),
        "no client certificate: {}",
        text(&out)
    );

    // A renewed certificate replaces the running one without a restart.
    let renewed = mesh.pki.server(&["localhost", "127.0.0.1"], "renewed");
    std::fs::copy(&renewed.cert, &server.cert).expect("replace the certificate");
    std::fs::copy(&renewed.key, &server.key).expect("replace the key");
    tokio::time::sleep(meshbridge_tls_reload_wait()).await;
    reaches(&cloud, tls, &user, "telemetry/robot5/renewed").await;
    let log = agent.log_text();
    assert!(log.contains("TLS certificate reloaded"), "{log}");
}

/// Publishes to `topic` through `port` with `args` and checks it reaches the cloud.
async fn reaches(cloud: &Collector, port: u16, args: &[&str], topic: &str) {
    let out = mosquitto_pub(port, &[args, &["-t", topic, "-m", "1"]].concat()).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        cloud
            .wait_until(WAIT, |r| r.iter().any(|m| m.topic.ends_with(topic)))
            .await,
        "{topic} did not reach the cloud"
    );
}

/// A little longer than the certificate files' check interval (`tls/src/server.rs`).
fn meshbridge_tls_reload_wait() -> Duration {
    Duration::from_millis(2_500)
}

/// Issue 11 items 2 and 3 at the hub: its embedded cloud broker takes the same password file and ACL, and
/// counts its refusals in the hub's own metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_cloud_broker_checks_users_and_counts_refusals() {
    if clients_skip("the_hubs_cloud_broker_checks_users_and_counts_refusals") {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let password_file = mesh.path().join("cloud-passwd");
    let acl_file = mesh.path().join("cloud-acl");
    passwd(&password_file, "dashboard", "dash-secret");
    std::fs::write(&acl_file, "user dashboard\ntopic read acme/#\n").expect("write the ACL");
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.broker_extra = vec![
        format!("password_file = {:?}", password_file.display().to_string()),
        format!("acl_file = {:?}", acl_file.display().to_string()),
    ];
    let metrics = meshbridge_tests::net::free_tcp();
    hub_spec.metrics = Some(metrics);
    let _hub = mesh.start_hub(&hub_spec).await;
    let cloud = hub_spec.broker.client_addr().port();

    let anonymous = mosquitto_pub(cloud, &["-t", "acme/x", "-m", "x"]).await;
    assert!(
        !anonymous.status.success(),
        "anonymous: {}",
        text(&anonymous)
    );
    let wrong = publish_as(cloud, "dashboard", "wrong", "acme/x").await;
    assert!(!wrong.status.success(), "wrong password: {}", text(&wrong));
    let denied = publish_as(cloud, "dashboard", "dash-secret", "acme/plant1/line1/cmd").await;
    assert!(
        text(&denied).contains("rc135") || text(&denied).contains("Not authorized"),
        "a read-only user's publish is answered 0x87: {}",
        text(&denied)
    );

    let body = meshbridge_tests::metrics::scrape(metrics).await;
    let value = |series: &str| meshbridge_tests::metrics::sample(&body, series);
    assert_eq!(
        value("meshbridge_mqtt_logins_refused_total"),
        Some(2),
        "{body}"
    );
    assert_eq!(
        value("meshbridge_acl_denied_total{action=\"publish\"}"),
        Some(1),
        "{body}"
    );
}
