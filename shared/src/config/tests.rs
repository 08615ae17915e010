//! Loading tests against the fixtures in `shared/testdata/config/` and the example configs in `configs/`.
//!
//! Loading reads `MESHBRIDGE_*` environment variables, which are process-wide while tests run in parallel
//! threads: every test that loads a file holds [`ENV_LOCK`] for reading, and the one test that sets variables
//! holds it for writing, so no load ever sees another test's overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;

use super::*;

static ENV_LOCK: RwLock<()> = RwLock::new(());

fn env_read() -> RwLockReadGuard<'static, ()> {
    ENV_LOCK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/config")
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The problems of an `Invalid` error as `key: message` lines, failing the test on any other outcome.
fn problem_lines<T: std::fmt::Debug>(result: Result<T, ConfigError>) -> Vec<String> {
    match result {
        Err(ConfigError::Invalid { errors, .. }) => {
            errors.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected ConfigError::Invalid, got {other:?}"),
    }
}

#[test]
fn valid_agent_loads_with_defaults_and_resolved_paths() {
    let _env = env_read();
    let path = fixture("agent-valid.toml");
    let config = load_agent(&path).expect("agent-valid.toml loads");
    let dir = fixtures();

    assert_eq!(config.site, "line1");
    assert_eq!(config.data_dir, dir.join("../state/line1"));
    assert_eq!(config.log, "info", "default log directive");
    let BrokerConfig::Embedded(broker) = &config.broker else {
        panic!("expected embedded, got {:?}", config.broker)
    };
    assert_eq!(
        broker.listen,
        "127.0.0.1:1884"
            .parse::<SocketAddr>()
            .expect("literal address")
    );
    assert_eq!(
        (
            broker.username.as_ref(),
            broker.password.as_ref(),
            broker.tls.as_ref()
        ),
        (None, None, None)
    );
    assert_eq!(broker.max_payload, ByteSize::kib(256));
    assert_eq!(broker.max_connections, 1024);

    let up = &config.uplink;
    assert_eq!((up.hub.host(), up.hub.port()), ("127.0.0.1", 4433));
    assert_eq!(up.server_name, "hub.meshbridge.local");
    assert_eq!(up.ca, dir.join("../certs/ca.pem"));
    assert_eq!(up.cert, dir.join("../certs/line1.pem"));
    assert_eq!(up.key, dir.join("../certs/line1.key"));
    assert_eq!(up.batch_max_messages, 512);
    assert_eq!(up.batch_max_bytes, ByteSize::mib(2), "set in the file");
    assert_eq!(up.window, 8);
    assert_eq!(up.reconnect_min, Duration::from_millis(100));
    assert_eq!(up.reconnect_max, Duration::from_secs(30), "set in the file");
    assert_eq!(up.keep_alive, Duration::from_millis(500));
    assert_eq!(up.idle_timeout, Duration::from_secs(2));
    assert_eq!(up.shutdown_timeout, Duration::from_secs(5));
    assert_eq!(up.max_frame_size, ByteSize::mib(8));
    assert_eq!(up.max_message_size, ByteSize::kib(256));

    assert_eq!(config.queue.max_bytes, ByteSize::mib(512));
    assert_eq!(config.queue.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(config.queue.full_policy, FullPolicy::DropOldest);

    assert_eq!(
        config.routes,
        vec![
            Route {
                filter: "telemetry/#".into(),
                qos: Some(1),
                retain: true
            },
            Route {
                filter: "alarms/+/active".into(),
                qos: None,
                retain: false
            },
        ]
    );
}

#[test]
fn valid_hub_loads_with_defaults_and_resolved_paths() {
    let _env = env_read();
    let config = load_hub(&fixture("hub-valid.toml")).expect("hub-valid.toml loads");
    let dir = fixtures();

    assert_eq!(config.data_dir, dir.join("../state/hub"));
    assert_eq!(config.log, "info,cloud_hub=debug");
    assert_eq!(
        config.listen.quic,
        "127.0.0.1:4433"
            .parse::<SocketAddr>()
            .expect("literal address")
    );
    assert_eq!(config.listen.max_connections, 1024);
    assert_eq!(config.tls.ca, dir.join("../certs/ca.pem"));
    assert_eq!(config.tls.cert, dir.join("../certs/hub.pem"));
    assert_eq!(
        config.tls.key,
        PathBuf::from("/etc/meshbridge/hub.key"),
        "absolute paths are kept"
    );

    let BrokerConfig::External(broker) = &config.broker else {
        panic!("expected external, got {:?}", config.broker)
    };
    assert_eq!(broker.address.to_string(), "broker.cloud.local:8883");
    assert_eq!(
        broker.client_id.as_deref(),
        Some("meshbridge-hub"),
        "hub default client id"
    );
    assert_eq!(broker.username.as_deref(), Some("hub"));
    assert_eq!(broker.password.as_ref().map(Secret::expose), Some("s3cret"));
    assert_eq!(broker.keep_alive, Duration::from_secs(60));
    assert_eq!(
        broker.tls,
        Some(ClientTls {
            ca: dir.join("../certs/cloud-ca.pem"),
            cert: None,
            key: None
        })
    );

    assert_eq!(config.dedup.window, 8192);
    assert_eq!(config.limits.max_frame_size, ByteSize::mib(8));
    assert_eq!(config.limits.max_message_size, ByteSize::kib(256));

    let namespaces: Vec<String> = config
        .sites
        .iter()
        .map(|s| s.expanded_namespace().expect("validated namespace"))
        .collect();
    assert_eq!(
        namespaces,
        [
            "acme/plant1/line1",
            "acme/plant1/line2",
            "acme/plant10/press"
        ]
    );
}

#[test]
fn bad_agent_reports_every_problem_with_its_key() {
    let _env = env_read();
    let path = fixture("agent-bad.toml");
    let result = load_agent(&path);
    let display = result.as_ref().map(drop).map_err(ToString::to_string);
    let lines = problem_lines(result);
    let expected = [
        "site: invalid site name `line/1`: site name has forbidden character '/' at byte 4",
        "broker.username: is set but `broker.password` is not: set both or neither",
        "broker.tls.cert: is set but `broker.tls.key` is not: set both or neither",
        "broker.keep_alive: must be greater than zero",
        "uplink.server_name: must not be empty",
        "uplink.batch_max_messages: must be between 1 and 65536, got 0",
        "uplink.window: must be between 1 and 1024, got 2000",
        "uplink.reconnect_min: must not exceed uplink.reconnect_max (10s), got 1m",
        "uplink.idle_timeout: must be greater than uplink.keep_alive (20s), got 15s",
        "uplink.max_frame_size: must be at least 8256KiB (uplink.batch_max_bytes + 64KiB overhead), got 8MiB",
        "uplink.max_frame_size: must be at least 9280KiB (uplink.max_message_size + 64KiB overhead), got 8MiB",
        "queue.max_bytes: must be at least 1MiB (the size of an empty queue file), got 100KiB",
        "routes[0].filter: invalid topic filter `telemetry/#/x`: `#` must be alone in the last level",
        "routes[0].qos: must be between 0 and 2, got 3",
        "routes[2].filter: duplicate of routes[1].filter",
    ];
    assert_eq!(lines, expected);

    // The Display of the whole error names the file and lists every problem on its own line.
    let display = display.expect_err("invalid");
    let mut display_lines = display.lines();
    assert_eq!(
        display_lines.next(),
        Some(format!("invalid config {}: 15 problem(s)", path.display()).as_str())
    );
    assert_eq!(display_lines.map(str::trim).collect::<Vec<_>>(), expected);
}

#[test]
fn bad_hub_reports_every_problem_with_its_key() {
    let _env = env_read();
    let lines = problem_lines(load_hub(&fixture("hub-bad.toml")));
    assert_eq!(
        lines,
        [
            "listen.max_connections: must be between 1 and 1000000, got 0",
            "listen.retry_above: must be below listen.max_handshakes (16), got 16",
            "broker.password: is set but `broker.username` is not: set both or neither",
            "broker.allow_anonymous: the cloud broker requires authentication: set broker.password_file, or \
             broker.allow_anonymous = true to let in anyone who can reach broker.listen",
            "dedup.window: must be between 1 and 1048576, got 0",
            "limits.max_frame_size: must be at least 320KiB (limits.max_message_size + 64KiB overhead), got 256KiB",
            "sites[1].name: duplicate of sites[0].name",
            "sites[1].namespace: invalid namespace template `acme/{plant}/{site}`: unknown placeholder `{plant}`: \
             only `{site}` is supported",
            "sites[2].namespace: `acme/plant1` overlaps sites[0].namespace (`acme/plant1/line1`)",
            "sites[3].namespace: duplicate of sites[0].namespace",
            "sites[3].namespace: `acme/plant1/line1` overlaps sites[2].namespace (`acme/plant1`)",
            "sites[4].namespace: invalid namespace template `/acme/+/{site}`: it contains a wildcard (`+` or `#`)",
        ]
    );
}

#[test]
fn unknown_key_is_refused_and_named() {
    let _env = env_read();
    let err = load_agent(&fixture("agent-unknown-key.toml")).expect_err("unknown key refused");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("windw"), "error names the key: {text}");
    assert!(
        text.contains("agent-unknown-key.toml"),
        "error names the file: {text}"
    );
}

#[test]
fn unknown_keys_inside_tagged_broker_and_top_level_are_refused() {
    let base = Path::new("/etc/meshbridge");
    let good = std::fs::read_to_string(fixture("agent-valid.toml")).expect("fixture readable");
    let table = [
        (
            "top level",
            good.replacen("site = \"line1\"", "site = \"line1\"\nsiet = \"x\"", 1),
            "siet",
        ),
        (
            "embedded broker",
            good.replacen(
                "kind = \"embedded\"",
                "kind = \"embedded\"\nlisten_addr = \"x\"",
                1,
            ),
            "listen_addr",
        ),
        (
            "broker kind",
            good.replacen("kind = \"embedded\"", "kind = \"mosquito\"", 1),
            "mosquito",
        ),
        (
            "queue policy",
            good.replacen("\"drop-oldest\"", "\"drop_oldest\"", 1),
            "drop_oldest",
        ),
        (
            "route",
            good.replacen("qos = 1", "qos = 1\nqs = 1", 1),
            "qs",
        ),
    ];
    for (what, text, needle) in table {
        let err = AgentConfig::from_toml_str(&text, base).expect_err(what);
        assert!(
            matches!(
                err,
                ConfigError::Parse {
                    source_name: ConfigSource::Text,
                    ..
                }
            ),
            "{what}: {err:?}"
        );
        assert!(
            err.to_string().contains(needle),
            "{what}: error should name `{needle}`: {err}"
        );
    }
}

#[test]
fn missing_file_names_the_path() {
    let _env = env_read();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.toml");
    for result in [load_agent(&path).map(drop), load_hub(&path).map(drop)] {
        let err = result.expect_err("missing file");
        let ConfigError::Read {
            path: reported,
            source,
        } = &err
        else {
            panic!("expected Read, got {err:?}")
        };
        assert_eq!(reported, &path);
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        let text = err.to_string();
        assert!(
            text.contains("nope.toml") && !text.contains("missing field"),
            "{text}"
        );
    }
}

#[test]
fn relative_file_path_resolves_against_its_absolute_directory() {
    let _env = env_read();
    // A path relative to the working directory (the crate root under `cargo test`).
    let config = load_agent(Path::new("testdata/config/agent-valid.toml")).expect("loads");
    assert!(
        config.data_dir.is_absolute(),
        "{}",
        config.data_dir.display()
    );
    assert_eq!(config.data_dir, fixtures().join("../state/line1"));
}

#[test]
fn env_overrides_file_values() {
    // Writer side of the lock: no other test loads while these variables exist.
    let _env = ENV_LOCK
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let vars = [
        ("MESHBRIDGE_UPLINK__WINDOW", "16"),
        ("MESHBRIDGE_UPLINK__KEEP_ALIVE", "1s"),
        ("MESHBRIDGE_QUEUE__MAX_BYTES", "2GiB"),
        ("MESHBRIDGE_LOG", "debug"),
        // figment parses values, so these arrive as numbers and must still land in string fields.
        ("MESHBRIDGE_SITE", "42"),
        ("MESHBRIDGE_BROKER__USERNAME", "1001"),
        ("MESHBRIDGE_BROKER__PASSWORD", "123456"),
    ];
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
    let agent = load_agent(&fixture("agent-valid.toml"));
    // An override that breaks a rule is validated like a file value.
    std::env::set_var("MESHBRIDGE_UPLINK__WINDOW", "0");
    let invalid = load_agent(&fixture("agent-valid.toml"));
    // A misspelt variable is refused like an unknown key in the file, and the message names the variable.
    std::env::set_var("MESHBRIDGE_UPLINK__WINDW", "4");
    let misspelt = load_agent(&fixture("agent-valid.toml"));
    std::env::remove_var("MESHBRIDGE_UPLINK__WINDW");
    for (name, _) in vars {
        std::env::remove_var(name);
    }

    let agent = agent.expect("loads with overrides");
    assert_eq!(agent.uplink.window, 16);
    assert_eq!(agent.uplink.keep_alive, Duration::from_secs(1));
    assert_eq!(agent.queue.max_bytes, ByteSize::gib(2));
    assert_eq!(agent.log, "debug");
    assert_eq!(agent.site, "42");
    let BrokerConfig::Embedded(broker) = &agent.broker else {
        panic!("expected embedded")
    };
    assert_eq!(broker.username.as_deref(), Some("1001"));
    assert_eq!(broker.password.as_ref().map(Secret::expose), Some("123456"));
    assert_eq!(
        agent.uplink.batch_max_bytes,
        ByteSize::mib(2),
        "untouched file value"
    );
    assert_eq!(
        problem_lines(invalid),
        ["uplink.window: must be between 1 and 1024, got 0"]
    );
    let err = misspelt.expect_err("unknown key from the environment");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    assert!(
        err.to_string().contains("uplink.windw: unknown field"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("environment variable MESHBRIDGE_UPLINK__WINDW"),
        "{err}"
    );
}

#[test]
fn from_toml_str_resolves_against_base_and_fills_agent_client_id() {
    let text = r##"
        site = "press"
        data_dir = "state"
        [broker]
        kind = "external"
        address = "[::1]:1883"
        tls = { ca = "ca.pem", cert = "/abs/client.pem", key = "client.key" }
        [uplink]
        hub = "hub.example.com:4433"
        server_name = "hub.example.com"
        ca = "ca.pem"
        cert = "press.pem"
        key = "press.key"
        keep_alive = "250ms"
        idle_timeout = "1s"
        [[routes]]
        filter = "#"
    "##;
    let base = Path::new("/var/lib/meshbridge");
    let config = AgentConfig::from_toml_str(text, base).expect("valid text");
    assert_eq!(config.data_dir, base.join("state"));
    let BrokerConfig::External(broker) = &config.broker else {
        panic!("expected external")
    };
    assert_eq!(broker.client_id.as_deref(), Some("meshbridge-press"));
    assert_eq!(
        broker.keep_alive,
        Duration::from_secs(30),
        "default keep-alive"
    );
    assert_eq!(
        broker.tls,
        Some(ClientTls {
            ca: base.join("ca.pem"),
            cert: Some(PathBuf::from("/abs/client.pem")),
            key: Some(base.join("client.key")),
        })
    );
    assert_eq!(
        (broker.address.host(), broker.address.port()),
        ("::1", 1883)
    );
    assert_eq!(config.uplink.keep_alive, Duration::from_millis(250));
    assert_eq!(config.uplink.idle_timeout, Duration::from_secs(1));
}

#[test]
fn durations_and_sizes_parse_in_files() {
    let base = Path::new("/cfg");
    let good = std::fs::read_to_string(fixture("agent-valid.toml")).expect("fixture readable");
    type Getter = fn(&AgentConfig) -> String;
    let table: &[(&str, &str, Getter, &str)] = &[
        (
            "reconnect_max = \"30s\"",
            "reconnect_max = \"1h 30m\"",
            |c| format!("{:?}", c.uplink.reconnect_max),
            "5400s",
        ),
        (
            "reconnect_max = \"30s\"",
            "reconnect_max = \"1500ms\"",
            |c| format!("{:?}", c.uplink.reconnect_max),
            "1.5s",
        ),
        (
            "[queue]",
            "[queue]\nmax_age = \"2days\"",
            |c| format!("{:?}", c.queue.max_age),
            "172800s",
        ),
        (
            "batch_max_bytes = \"2MiB\"",
            "batch_max_bytes = 4096",
            |c| c.uplink.batch_max_bytes.to_string(),
            "4KiB",
        ),
        (
            "batch_max_bytes = \"2MiB\"",
            "batch_max_bytes = \"1.5 MB\"",
            |c| c.uplink.batch_max_bytes.0.to_string(),
            "1500000",
        ),
    ];
    for (from, to, get, expected) in table {
        let text = good.replacen(from, to, 1);
        let config =
            AgentConfig::from_toml_str(&text, base).unwrap_or_else(|e| panic!("{to}: {e}"));
        assert_eq!(get(&config), *expected, "{to}");
    }

    let bad = [
        (
            "reconnect_max = \"30s\"",
            "reconnect_max = \"30\"",
            "reconnect_max",
        ),
        (
            "reconnect_max = \"30s\"",
            "reconnect_max = 30",
            "reconnect_max",
        ),
        (
            "batch_max_bytes = \"2MiB\"",
            "batch_max_bytes = \"2 furlongs\"",
            "furlongs",
        ),
        (
            "batch_max_bytes = \"2MiB\"",
            "batch_max_bytes = -1",
            "batch_max_bytes",
        ),
        ("hub = \"127.0.0.1:4433\"", "hub = \"127.0.0.1\"", "no port"),
    ];
    for (from, to, needle) in bad {
        let err = AgentConfig::from_toml_str(&good.replacen(from, to, 1), base).expect_err(to);
        assert!(matches!(err, ConfigError::Parse { .. }), "{to}: {err:?}");
        assert!(
            err.to_string().contains(needle),
            "{to}: error should mention `{needle}`: {err}"
        );
    }
}

#[test]
fn validate_table_on_single_changes() {
    // Each row changes one thing in the valid hub fixture and expects exactly these problems.
    let base = Path::new("/cfg");
    let good = std::fs::read_to_string(fixture("hub-valid.toml")).expect("fixture readable");
    let table: &[(&str, &str, &[&str])] = &[
        ("name = \"press\"", "name = \"line1\"", &["sites[2].name: duplicate of sites[0].name"]),
        ("keep_alive = \"1m\"", "keep_alive = \"0s\"", &["broker.keep_alive: must be greater than zero"]),
        (
            "keep_alive = \"1m\"",
            "keep_alive = \"19h\"",
            &["broker.keep_alive: must be between 1s and 18h 12m 15s, got 19h"],
        ),
        ("password = \"s3cret\"\n", "", &["broker.username: is set but `broker.password` is not: set both or neither"]),
        ("keep_alive = \"1m\"", "keep_alive = \"1s\"", &[]),
        ("namespace = \"acme/plant10/{site}\"", "namespace = \"acme/plant1\"", &[
            "sites[2].namespace: `acme/plant1` overlaps sites[0].namespace (`acme/plant1/line1`)",
            "sites[2].namespace: `acme/plant1` overlaps sites[1].namespace (`acme/plant1/line2`)",
        ]),
        ("namespace = \"acme/plant10/{site}\"", "namespace = \"{site}/x/\"", &[
            "sites[2].namespace: invalid namespace template `{site}/x/`: it has an empty level (leading, trailing or \
             doubled `/`)",
        ]),
        ("name = \"press\"", "name = \"pr#ss\"", &["sites[2].name: invalid site name `pr#ss`: site name has forbidden character '#' at byte 2"]),
        ("window = 8192", "window = 2000000", &["dedup.window: must be between 1 and 1048576, got 2000000"]),
        ("data_dir = \"../state/hub\"", "data_dir = \"\"", &["data_dir: must not be empty"]),
        ("{ ca = \"../certs/cloud-ca.pem\" }", "{ ca = \"\" }", &["broker.tls.ca: must not be empty"]),
    ];
    for (from, to, expected) in table {
        let text = good.replacen(from, to, 1);
        let result = HubConfig::from_toml_str(&text, base);
        if expected.is_empty() {
            result.unwrap_or_else(|e| panic!("{to}: {e}"));
        } else {
            assert_eq!(problem_lines(result), *expected, "{from} -> {to}");
        }
    }
}

#[test]
fn a_hub_without_sites_loads_and_an_agent_without_routes_is_refused() {
    let base = Path::new("/cfg");
    let hub = std::fs::read_to_string(fixture("hub-valid.toml")).expect("fixture readable");
    // A fresh install: `cloud-hub site add` appends the first site to a file without any.
    let before_sites = hub.split("[[sites]]").next().expect("text before sites");
    let cfg = HubConfig::from_toml_str(before_sites, base).expect("no sites is valid");
    assert!(cfg.sites.is_empty());
    let cfg = HubConfig::from_toml_str(&("sites = []\n".to_owned() + before_sites), base)
        .expect("an empty list is valid too");
    assert!(cfg.sites.is_empty());

    let agent = std::fs::read_to_string(fixture("agent-valid.toml")).expect("fixture readable");
    let agent = agent
        .split("[[routes]]")
        .next()
        .expect("text before routes")
        .to_owned();
    let agent = agent.replacen("site = \"line1\"", "site = \"line1\"\nroutes = []", 1);
    assert_eq!(
        problem_lines(AgentConfig::from_toml_str(&agent, base)),
        ["routes: must not be empty"]
    );
}

#[test]
fn serialized_config_reads_back_identical() {
    let _env = env_read();
    let agent = load_agent(&fixture("agent-valid.toml")).expect("loads");
    let text = toml::to_string(&agent).expect("serializes");
    assert_eq!(
        AgentConfig::from_toml_str(&text, Path::new("/unused")).expect("reads back"),
        agent
    );

    let hub = load_hub(&fixture("hub-valid.toml")).expect("loads");
    let text = toml::to_string(&hub).expect("serializes");
    assert_eq!(
        HubConfig::from_toml_str(&text, Path::new("/unused")).expect("reads back"),
        hub
    );
}

#[test]
fn example_configs_in_repo_load() {
    let _env = env_read();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no {} directory yet; nothing to check", dir.display());
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable configs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    for path in &paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("hub") {
            load_hub(path).unwrap_or_else(|e| panic!("{e}"));
        } else if name.starts_with("edge") {
            load_agent(path).unwrap_or_else(|e| panic!("{e}"));
        } else {
            panic!(
                "{}: example configs must be named hub*.toml or edge*.toml",
                path.display()
            );
        }
    }
    eprintln!(
        "{} example config(s) loaded from {}",
        paths.len(),
        dir.display()
    );
}

#[test]
fn agent_name_of_a_redundant_pair_member_is_checked() {
    let _env = env_read();
    let text = std::fs::read_to_string(fixture("agent-valid.toml")).expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let long = "x".repeat(65);
    for (name, valid) in [
        ("a", true),
        ("pair-1.b_2", true),
        ("a b", false),
        ("", false),
        ("line1/a", false),
        (long.as_str(), false),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("agent_name = {name:?}\n{text}")).expect("write");
        let loaded = load_agent(&path);
        if valid {
            let config = loaded.unwrap_or_else(|e| panic!("{name:?} refused: {e}"));
            assert_eq!(config.agent_name.as_deref(), Some(name));
        } else {
            let lines = problem_lines(loaded);
            assert!(
                lines.iter().any(|l| l.contains("agent_name")),
                "{name:?}: {lines:?}"
            );
        }
    }
}

#[test]
fn broker_auth_settings_are_checked_together() {
    let base = Path::new("/cfg");
    let good = std::fs::read_to_string(fixture("agent-valid.toml")).expect("fixture readable");
    let listen = "listen = \"127.0.0.1:1884\"";
    let table: &[(&str, &[&str])] = &[
        ("password_file = \"passwd\"\nacl_file = \"acl\"\nallow_anonymous = true", &[]),
        (
            "password_file = \"passwd\"\nusername = \"u\"\npassword = \"p\"",
            &["broker.password_file: cannot be set together with broker.username: the password file holds the users; drop username/password"],
        ),
        (
            "allow_anonymous = true\nusername = \"u\"\npassword = \"p\"",
            &["broker.allow_anonymous: cannot be set together with broker.username: with username/password every client must present them"],
        ),
        (
            "acl_file = \"acl\"\nusername = \"u\"\npassword = \"p\"",
            &["broker.acl_file: cannot be set together with broker.username: ACL users come from a password_file"],
        ),
    ];
    for (extra, expected) in table {
        let text = good.replacen(listen, &format!("{listen}\n{extra}"), 1);
        let result = AgentConfig::from_toml_str(&text, base);
        if expected.is_empty() {
            let cfg = result.unwrap_or_else(|e| panic!("{extra}: {e}"));
            let crate::config::BrokerConfig::Embedded(b) = &cfg.broker else {
                panic!("embedded")
            };
            assert_eq!(
                b.password_file.as_deref(),
                Some(Path::new("/cfg/passwd")),
                "resolved against the config's directory"
            );
        } else {
            assert_eq!(problem_lines(result), *expected, "{extra}");
        }
    }
}

#[test]
fn the_hubs_embedded_cloud_broker_is_closed_unless_the_config_opens_it() {
    let base = Path::new("/cfg");
    let hub = |broker: &str| {
        format!(
            "data_dir = \"state\"\n[listen]\nquic = \"127.0.0.1:4433\"\n[tls]\nca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub.key\"\n[broker]\nkind = \"embedded\"\n{broker}\n[[sites]]\nname = \"line1\"\nnamespace = \"acme/{{site}}\"\n"
        )
    };
    assert_eq!(
        problem_lines(HubConfig::from_toml_str(&hub(""), base)),
        ["broker.allow_anonymous: the cloud broker requires authentication: set broker.password_file, or broker.allow_anonymous = true to let in anyone who can reach broker.listen"]
    );
    assert_eq!(
        problem_lines(HubConfig::from_toml_str(
            &hub("allow_anonymous = false"),
            base
        ))
        .len(),
        1
    );
    for open in ["allow_anonymous = true", "password_file = \"passwd\""] {
        HubConfig::from_toml_str(&hub(open), base).unwrap_or_else(|e| panic!("{open}: {e}"));
    }
}

/// The local mesh's demo user (README, "TLS ports"): the shipped files say what the README promises.
#[test]
fn the_shipped_demo_user_and_acl() {
    use crate::auth::acl::{Acl, Client};
    use crate::auth::passwd::Passwords;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("shipped file readable");
    let users = Passwords::parse(&read("edge-line1.passwd")).expect("valid password file");
    assert!(users.verify("robot5", b"robot5-secret"));
    let acl = Acl::parse(&read("edge-line1.acl")).expect("valid ACL");
    let robot5 = Client {
        user: Some("robot5"),
        client_id: "r5",
    };
    assert!(acl.can_publish(robot5, "telemetry/robot5/temp"));
    assert!(!acl.can_publish(robot5, "telemetry/robot6/temp"));
    let anonymous = Client {
        user: None,
        client_id: "tool",
    };
    assert!(
        acl.can_publish(anonymous, "telemetry/robot5/temp"),
        "the plaintext demo stays as it was"
    );
    assert!(acl.can_subscribe(anonymous, "$meshbridge/status"));
    assert!(acl.can_subscribe(anonymous, "cmd/#"));
}

/// Each program has its own prefix; the shared one still works for each program's own keys (with a
/// deprecation note), and an agent override in a shared environment no longer stops the hub.
#[test]
fn per_program_env_prefixes() {
    let _env = ENV_LOCK
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let vars = [
        ("MESHBRIDGE_QUEUE__MAX_BYTES", "2GiB"), // shared prefix, agent-only key
        ("MESHBRIDGE_UPLINK__WINDOW", "16"),     // shared prefix, agent key
        ("MESHBRIDGE_AGENT_UPLINK__WINDOW", "32"), // agent prefix: wins
        ("MESHBRIDGE_AGENT_NAME", "gateway-a"),  // keeps its old meaning, agent_name
        ("MESHBRIDGE_HUB_DEDUP__WINDOW", "128"), // hub prefix, ignored by the agent
        ("MESHBRIDGE_LOG", "debug"),             // shared prefix, a key of both
    ];
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
    let agent = load_agent(&fixture("agent-valid.toml"));
    let hub = load_hub(&fixture("hub-valid.toml"));
    std::env::set_var("MESHBRIDGE_DEDUPE__WINDOW", "4");
    let typo = load_hub(&fixture("hub-valid.toml"));
    std::env::remove_var("MESHBRIDGE_DEDUPE__WINDOW");
    std::env::set_var("MESHBRIDGE_HUB_DEDUP__WINDW", "4");
    let own_typo = load_hub(&fixture("hub-valid.toml"));
    std::env::remove_var("MESHBRIDGE_HUB_DEDUP__WINDW");
    let names = || std::env::vars().map(|(k, _)| k);
    let agent_notes = deprecated_env(Program::Agent, names());
    let hub_notes = deprecated_env(Program::Hub, names());
    for (name, _) in vars {
        std::env::remove_var(name);
    }

    let agent = agent.expect("the agent loads");
    assert_eq!(agent.uplink.window, 32);
    assert_eq!(agent.queue.max_bytes, ByteSize::gib(2));
    assert_eq!(agent.agent_name.as_deref(), Some("gateway-a"));
    assert_eq!(agent.log, "debug");
    let hub = hub.expect("the hub ignores the agent's variables");
    assert_eq!(hub.dedup.window, 128);
    assert_eq!(hub.log, "debug");
    let typo = typo
        .expect_err("a key of neither program is refused")
        .to_string();
    assert!(
        typo.contains("MESHBRIDGE_DEDUPE__WINDOW") || typo.contains("dedupe"),
        "{typo}"
    );
    let own_typo = own_typo
        .expect_err("a typo under the hub's prefix is refused")
        .to_string();
    assert!(
        own_typo.contains("MESHBRIDGE_HUB_DEDUP__WINDW"),
        "{own_typo}"
    );
    assert_eq!(
        agent_notes,
        [
            "environment variable MESHBRIDGE_AGENT_NAME uses the shared MESHBRIDGE_ prefix, which is deprecated: name it MESHBRIDGE_AGENT_AGENT_NAME",
            "environment variable MESHBRIDGE_LOG uses the shared MESHBRIDGE_ prefix, which is deprecated: name it MESHBRIDGE_AGENT_LOG",
            "environment variable MESHBRIDGE_QUEUE__MAX_BYTES uses the shared MESHBRIDGE_ prefix, which is deprecated: name it MESHBRIDGE_AGENT_QUEUE__MAX_BYTES",
            "environment variable MESHBRIDGE_UPLINK__WINDOW uses the shared MESHBRIDGE_ prefix, which is deprecated: name it MESHBRIDGE_AGENT_UPLINK__WINDOW",
        ]
    );
    assert_eq!(
        hub_notes,
        ["environment variable MESHBRIDGE_LOG uses the shared MESHBRIDGE_ prefix, which is deprecated: name it MESHBRIDGE_HUB_LOG"]
    );
}

/// The key lists the environment filters use are the models' top-level keys (serde names every field it
/// expected when it meets an unknown one).
#[test]
fn env_key_lists_match_the_models() {
    fn expected_fields<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let err = toml::from_str::<T>("__probe__ = 1").expect_err("unknown key");
        let text = err.to_string();
        let list = text
            .split("expected one of")
            .nth(1)
            .unwrap_or_else(|| panic!("serde lists the fields: {text}"));
        let mut fields: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        fields.sort();
        fields
    }
    let sorted = |keys: &[&str]| {
        let mut v: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(expected_fields::<AgentConfig>(), sorted(load::AGENT_KEYS));
    assert_eq!(expected_fields::<HubConfig>(), sorted(load::HUB_KEYS));
}

/// Issue 13 item 5: a file with several mistakes lists every one of them in one run, each with its key
/// path, and with the value where the message would not show it. (figment alone stops at the first.)
#[test]
fn every_mistake_of_a_file_is_listed_at_once() {
    let text = r#"
site = "line1"
data_dir = 5
colour = "blue"

[broker]
kind = "embedded"
listen = "127.0.0.1:99999"

[uplink]
hub = "127.0.0.1:4433"
server_name = "hub.meshbridge.local"
ca = "ca.pem"
cert = "line1.pem"
key = "line1.key"
batch_max_bytes = "2 furlongs"
window = "eight"

[[routes]]
filter = "telemetry/#"
qos = 7

[[routes]]
filter = "alarms/+/active"
retain = "maybe"
"#;
    let err = AgentConfig::from_toml_str(text, Path::new("/etc/meshbridge")).expect_err("invalid");
    let shown = err.to_string();
    assert!(shown.contains("7 problem(s)"), "{shown}");
    for line in [
        "broker.listen: invalid socket address syntax (value: \"127.0.0.1:99999\")",
        "colour: unknown field",
        "data_dir: invalid type: found signed int `5`",
        "routes[1].retain: invalid type: found string \"maybe\"",
        "uplink.batch_max_bytes: unknown byte-size unit `furlongs`",
        "(value: \"2 furlongs\")",
        "uplink.window: invalid type: found string \"eight\"",
        // The rules still run on the rest of the file.
        "routes[0].qos: must be between 0 and 2, got 7",
    ] {
        assert!(shown.contains(line), "missing {line:?} in:\n{shown}");
    }
    match err {
        ConfigError::Parse {
            error, problems, ..
        } => {
            assert_eq!(error.count(), 6, "{shown}");
            assert_eq!(problems.len(), 1, "{problems:?}");
        }
        other => panic!("{other:?}"),
    }

    // Required keys missing, and one of the wrong type: all named, none hides another.
    let err = AgentConfig::from_toml_str(
        "site = [1]\n[broker]\nkind = \"embedded\"\n[queue]\nmax_bytes = true\n",
        Path::new("/"),
    )
    .expect_err("invalid");
    let shown = err.to_string();
    for needle in [
        "site: invalid type",
        "missing field `data_dir`",
        "missing field `uplink`",
        "queue.max_bytes: invalid type",
    ] {
        assert!(shown.contains(needle), "missing {needle:?} in:\n{shown}");
    }

    // The hub's file too, with a bad value inside a tagged table and an unknown key in a site.
    let hub = r#"
data_dir = "state"
[listen]
quic = "127.0.0.1:4433"
max_connections = -1
[tls]
ca = "ca.pem"
cert = "hub.pem"
key = "hub.key"
[broker]
kind = "embedded"
listen = "nowhere"
[[sites]]
name = "line1"
namespace = "acme/{site}"
colour = "red"
"#;
    let err = HubConfig::from_toml_str(hub, Path::new("/")).expect_err("invalid");
    let shown = err.to_string();
    for needle in [
        "listen.max_connections: invalid",
        "broker.listen: invalid socket address syntax (value: \"nowhere\")",
        "sites[0].colour: unknown field",
    ] {
        assert!(shown.contains(needle), "missing {needle:?} in:\n{shown}");
    }

    // A syntax error leaves no tree to go on with: it alone is reported, with its place.
    let err = AgentConfig::from_toml_str("site = \"line1\"\n[uplink\n", Path::new("/"))
        .expect_err("invalid");
    assert!(err.to_string().contains("1 problem(s)"), "{err}");
}
