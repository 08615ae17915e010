//! The programs' config commands (issue 13 item 5, in part): `check-config` says whether a config is valid
//! and lists every problem when it is not; `print-config` shows the effective config with passwords
//! redacted.

use std::path::{Path, PathBuf};
use std::process::Command;

use meshbridge_tests::bins::{bin, output_text as text, run, CLOUD_HUB, EDGE_AGENT};

/// A config fixture of the `shared` crate of this workspace (`shared/testdata/config/` at the repository
/// root, beside this `tests/` crate): the same files `shared::config`'s own tests load.
fn fixture(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root");
    root.join("shared")
        .join("testdata")
        .join("config")
        .join(name)
}

#[test]
fn check_config_accepts_valid_configs_and_lists_every_problem_of_bad_ones() {
    let agent_ok = fixture("agent-valid.toml");
    let out = run(
        EDGE_AGENT,
        &[
            "--config",
            agent_ok.to_str().expect("UTF-8"),
            "check-config",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("valid (site line1"), "{}", text(&out));

    let agent_bad = fixture("agent-bad.toml");
    let out = run(
        EDGE_AGENT,
        &[
            "--config",
            agent_bad.to_str().expect("UTF-8"),
            "check-config",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("15 problem(s)"), "{}", text(&out));

    let hub_ok = fixture("hub-valid.toml");
    let out = run(
        CLOUD_HUB,
        &["check-config", "--config", hub_ok.to_str().expect("UTF-8")],
    );
    assert!(out.status.success(), "{}", text(&out));

    let hub_bad = fixture("hub-bad.toml");
    let out = run(
        CLOUD_HUB,
        &["check-config", "--config", hub_bad.to_str().expect("UTF-8")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for key in [
        "listen.max_connections",
        "listen.retry_above",
        "dedup.window",
        "sites[4].namespace",
    ] {
        assert!(text(&out).contains(key), "{key} missing:\n{}", text(&out));
    }
}

#[test]
fn print_config_shows_the_effective_config_without_passwords() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        r#"site = "line1"
data_dir = "state"
[broker]
kind = "external"
address = "127.0.0.1:1883"
username = "meshbridge"
password = "hunter2"
[uplink]
hub = "127.0.0.1:4433"
server_name = "localhost"
ca = "ca.pem"
cert = "line1.pem"
key = "line1.key"
[[routes]]
filter = "telemetry/#"
"#,
    )
    .expect("write the config");
    let out = Command::new(bin(EDGE_AGENT))
        .args(["--config", config.to_str().expect("UTF-8"), "print-config"])
        .env("MESHBRIDGE_AGENT_UPLINK__WINDOW", "16")
        .output()
        .expect("run edge-agent");
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("password = \"<redacted>\""), "{printed}");
    assert!(
        printed.contains("window = 16"),
        "the environment override is shown: {printed}"
    );
    let data_dir = dir.path().join("state");
    assert!(
        printed.contains(&format!("data_dir = \"{}\"", data_dir.display())),
        "paths are resolved: {printed}"
    );
}
