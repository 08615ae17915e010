//! Issue 13 item 1: the Debian packages, installed into this very system as an operator would.
//!
//! `deploy/debian/build.sh --profile debug` packs the debug binaries the tests already have; then `dpkg -i`
//! both packages, `systemd-analyze verify` their units (no output at all: an unknown key is only a warning
//! there), the user, modes and owners the postinst scripts set, the shipped examples pass `check-config`,
//! the hub's config gets ephemeral ports, `cloud-hub site add` + `edge-agent bootstrap` make the agent's
//! config and certificate, both installed programs run as user `meshbridge` on the installed configs (as the
//! units would: no systemd PID 1 here, so no `systemctl`), a QoS 1 message goes from the agent's broker to
//! the hub's cloud broker, SIGTERM stops both cleanly, and `dpkg --purge` leaves nothing the packages made.
//!
//! It writes to /usr/bin, /lib/systemd/system, /etc and /var/lib, so it runs only as root and only when
//! asked (`CI=true` or `TEST_MESHBRIDGE_PACKAGES=1`); elsewhere it says loudly that it did not run. It
//! refuses to touch a system where meshbridge is already installed, and purges what it installed even when
//! an assertion fails.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, CLOUD_HUB, EDGE_AGENT};
use meshbridge_tests::mesh::{READY_TIMEOUT, STOP_TIMEOUT};
use meshbridge_tests::mosquitto::{self, client_tool, MosquittoSub};
use meshbridge_tests::net::{free_tcp, free_udp};
use meshbridge_tests::prereq;
use meshbridge_tests::process::Proc;

const PACKAGES: [&str; 2] = ["meshbridge-cloud-hub", "meshbridge-edge-agent"];
const TEST: &str = "debian_packages_install_serve_and_purge";
/// The variable that asks for this test outside CI. Not `MESHBRIDGE_*`: the programs (and the harness's
/// in-process config loads) take those as config keys and refuse unknown ones.
const ASK: &str = "TEST_MESHBRIDGE_PACKAGES";
/// Any one command of the test (dpkg, the build script) gets this long.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `program args`, bounded by [`COMMAND_TIMEOUT`] (`timeout` kills it), returning its output.
fn run(program: &str, args: &[&str]) -> Output {
    let secs = COMMAND_TIMEOUT.as_secs().to_string();
    Command::new("timeout")
        .args(["--kill-after=5", &secs, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// [`run`], asserting success; returns stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed(package: &str) -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", package]);
    out.status.success() && !out.stdout.ends_with(b"not-installed")
}

fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).status.success()
}

/// Purges the packages when dropped (a failed assertion included), and the `meshbridge` user if the test
/// made it: the system is left as it was found.
struct Cleanup {
    user_was_there: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", PACKAGES[0], PACKAGES[1]]);
        if !self.user_was_there && user_exists("meshbridge") {
            let _ = run("deluser", &["--system", "--quiet", "meshbridge"]);
        }
    }
}

/// (mode bits, owner name, group name) of `path`.
fn stat(path: &str) -> (u32, String, String) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let name = |db: &str, id: u32| {
        let line = ok("getent", &[db, &id.to_string()]);
        line.split(':').next().unwrap_or_default().to_owned()
    };
    (
        meta.permissions().mode() & 0o7777,
        name("passwd", meta.uid()),
        name("group", meta.gid()),
    )
}

fn assert_stat(path: &str, mode: u32, owner: &str, group: &str) {
    let (m, o, g) = stat(path);
    assert_eq!(
        (m, o.as_str(), g.as_str()),
        (mode, owner, group),
        "{path}: mode {m:o} {o}:{g}, expected {mode:o} {owner}:{group}"
    );
}

/// Replaces the one occurrence of `from` in `file` with `to`, as an operator's edit would.
fn edit(file: &str, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(
        text.matches(from).count(),
        1,
        "{file}: one {from:?} expected\n{text}"
    );
    std::fs::write(file, text.replacen(from, to, 1)).unwrap_or_else(|e| panic!("{file}: {e}"));
}

/// Arguments of `setpriv` that run `program args` as user meshbridge, the way the unit runs it (its own
/// uid, gid and groups, no root). `setpriv` execs: the pid is the program's.
fn as_meshbridge(program: &str, args: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "--reuid=meshbridge",
        "--regid=meshbridge",
        "--init-groups",
        "--",
        program,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    argv
}

/// The uid the process `pid` runs as (the real one, from /proc).
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("a Uid line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_packages_install_serve_and_purge() {
    let asked = std::env::var(ASK).is_ok_and(|v| v == "1");
    if !prereq::in_ci() && !asked {
        prereq::skipped(
            TEST,
            &format!(
                "it installs packages into this system (as root); set {ASK}=1 to run it here. CI=true runs it."
            ),
        );
        return;
    }
    if prereq::needs_root(TEST, "install packages into the system")
        || prereq::missing(
            TEST,
            Command::new("dpkg-deb").arg("--version").output().is_ok(),
            "dpkg-deb is missing",
            "a Debian system has it (package dpkg)",
        )
        || prereq::missing(
            TEST,
            Path::new("/usr/bin/systemd-analyze").exists(),
            "systemd-analyze is missing",
            "scripts/install-test-deps.sh installs Debian's systemd package",
        )
        || mosquitto::clients_skip(TEST)
    {
        return;
    }
    for package in PACKAGES {
        assert!(
            !installed(package),
            "{package} is installed on this system: this test would purge it; remove it first"
        );
    }
    for dir in ["/etc/meshbridge", "/var/lib/meshbridge"] {
        assert!(
            !Path::new(dir).exists(),
            "{dir} exists: this test would delete it; move it away first"
        );
    }
    let started = Instant::now();
    let work = tempfile::tempdir().expect("tempdir");
    // setpriv'd programs write nothing here but their logs go through our file handles; the bundle is
    // read by root (bootstrap) only.
    let cleanup = Cleanup {
        user_was_there: user_exists("meshbridge"),
    };

    // Build, from the debug binaries these tests run against.
    let bin_dir = bin(EDGE_AGENT)
        .parent()
        .expect("a binary directory")
        .to_path_buf();
    assert_eq!(bin(CLOUD_HUB).parent(), Some(bin_dir.as_path()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf();
    let out = work.path().join("debs");
    let built = ok(
        "bash",
        &[
            &root.join("deploy/debian/build.sh").to_string_lossy(),
            "--profile",
            "debug",
            "--bin-dir",
            &bin_dir.to_string_lossy(),
            "--out",
            &out.to_string_lossy(),
        ],
    );
    let debs: Vec<&str> = built.lines().filter(|l| l.ends_with(".deb")).collect();
    assert_eq!(debs.len(), 2, "two packages built: {built}");
    for deb in &debs {
        let info = ok(
            "dpkg-deb",
            &["--field", deb, "Depends", "Maintainer", "Version"],
        );
        assert!(info.contains("libc6 (>="), "{deb}: {info}");
        assert!(info.contains("adduser"), "{deb}: {info}");
        assert!(
            info.contains("Maintainer: meshbridge developers"),
            "{deb}: {info}"
        );
    }

    // What existed before, so "purge leaves nothing" spares /usr, /etc and the like.
    let mut existed = BTreeSet::new();
    for deb in &debs {
        for line in ok("dpkg-deb", &["--contents", deb]).lines() {
            let entry = line.split_whitespace().last().unwrap_or_default();
            let path = PathBuf::from(entry.trim_start_matches('.').trim_end_matches('/'));
            if path.as_os_str().is_empty() || std::fs::symlink_metadata(&path).is_ok() {
                existed.insert(path);
            }
        }
    }
    existed.insert(PathBuf::from("/."));
    let mut args = vec!["-i"];
    args.extend(debs.iter().copied());
    ok("dpkg", &args);
    let mut owned = BTreeSet::new();
    for package in PACKAGES {
        for line in ok("dpkg", &["-L", package]).lines() {
            owned.insert(PathBuf::from(line));
        }
    }

    // The units, as systemd would read them.
    let units = [
        "/lib/systemd/system/meshbridge-cloud-hub.service",
        "/lib/systemd/system/meshbridge-edge-agent.service",
    ];
    let mut verify = vec!["verify", "--man=no"];
    verify.extend(units);
    let out = run("systemd-analyze", &verify);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
    for unit in units {
        let text = std::fs::read_to_string(unit).expect("the unit");
        for line in [
            "Type=notify",
            "WatchdogSec=30s",
            "User=meshbridge",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=\n",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ] {
            assert!(text.contains(line), "{unit} lacks {line:?}");
        }
    }

    // The user, and what the postinst scripts made, with their modes and owners.
    let user = ok("getent", &["passwd", "meshbridge"]);
    let fields: Vec<&str> = user.trim().split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(uid < 1000, "a system user: {user}");
    assert_eq!(fields[5], "/var/lib/meshbridge", "{user}");
    assert!(
        fields[6].ends_with("nologin") || fields[6].ends_with("false"),
        "{user}"
    );
    ok("getent", &["group", "meshbridge"]);
    assert_stat("/usr/bin/edge-agent", 0o755, "root", "root");
    assert_stat("/usr/bin/cloud-hub", 0o755, "root", "root");
    assert_stat(units[0], 0o644, "root", "root");
    assert_stat(units[1], 0o644, "root", "root");
    assert_stat("/etc/meshbridge/hub.toml", 0o640, "root", "meshbridge");
    assert_stat("/etc/meshbridge/pki", 0o750, "root", "meshbridge");
    assert_stat("/etc/meshbridge/pki/ca.key", 0o600, "root", "root");
    assert_stat("/etc/meshbridge/pki/hub.key", 0o640, "root", "meshbridge");
    assert_stat("/etc/meshbridge/pki/crl.pem", 0o644, "root", "root");
    assert_stat("/etc/meshbridge/agent", 0o750, "root", "meshbridge");
    assert_stat("/var/lib/meshbridge", 0o755, "root", "root");
    assert_stat("/var/lib/meshbridge/hub", 0o750, "meshbridge", "meshbridge");
    assert_stat(
        "/var/lib/meshbridge/agent",
        0o750,
        "meshbridge",
        "meshbridge",
    );
    // The examples are valid as shipped.
    ok(
        "/usr/bin/cloud-hub",
        &[
            "check-config",
            "--config",
            "/etc/meshbridge/hub.toml.example",
        ],
    );
    ok(
        "/usr/bin/edge-agent",
        &[
            "--config",
            "/etc/meshbridge/agent.toml.example",
            "check-config",
        ],
    );

    // The operator: ports free on this machine, a site, its bundle installed.
    let hub_toml = "/etc/meshbridge/hub.toml";
    let (quic, cloud, hub_metrics) = (free_udp(), free_tcp(), free_tcp());
    edit(
        hub_toml,
        "quic = \"0.0.0.0:4433\"",
        &format!("quic = \"{quic}\""),
    );
    edit(
        hub_toml,
        "listen = \"127.0.0.1:1883\"",
        &format!("listen = \"{cloud}\""),
    );
    edit(
        hub_toml,
        "listen = \"127.0.0.1:9600\"",
        &format!("listen = \"{hub_metrics}\""),
    );
    let bundle = work.path().join("line3.bundle.tar");
    let bundle = bundle.to_string_lossy();
    let site_add = run("/usr/bin/cloud-hub", &["site", "add", "--help"])
        .status
        .success();
    assert!(
        site_add,
        "cloud-hub site add is missing: this test installs the agent's config with it"
    );
    ok(
        "/usr/bin/cloud-hub",
        &[
            "site",
            "add",
            "line3",
            "--config",
            hub_toml,
            "--hub-address",
            &quic.to_string(),
            "--namespace",
            "plant/{site}",
            "--out",
            &bundle,
        ],
    );
    ok("/usr/bin/edge-agent", &["bootstrap", &bundle]);
    let agent_toml = "/etc/meshbridge/agent.toml";
    let (edge, agent_metrics) = (free_tcp(), free_tcp());
    edit(
        agent_toml,
        "listen = \"127.0.0.1:1883\"",
        &format!("listen = \"{edge}\""),
    );
    edit(
        agent_toml,
        "listen = \"127.0.0.1:9601\"",
        &format!("listen = \"{agent_metrics}\""),
    );
    assert_stat(agent_toml, 0o640, "root", "meshbridge");
    assert_stat(
        "/etc/meshbridge/agent/site.key",
        0o640,
        "root",
        "meshbridge",
    );
    assert_stat(hub_toml, 0o640, "root", "meshbridge");
    // Readable by the service user, and valid.
    ok(
        "setpriv",
        &as_meshbridge_ref(&as_meshbridge(
            "/usr/bin/cloud-hub",
            &["check-config", "--config", hub_toml],
        )),
    );
    ok(
        "setpriv",
        &as_meshbridge_ref(&as_meshbridge(
            "/usr/bin/edge-agent",
            &["--config", agent_toml, "check-config"],
        )),
    );

    // Both programs, as their units start them, as user meshbridge.
    let logs = work.path();
    let mut hub = Proc::start_args(
        "hub",
        Path::new("/usr/bin/setpriv"),
        &as_meshbridge("/usr/bin/cloud-hub", &["run", "--config", hub_toml]),
        logs,
    );
    hub.wait_ready(cloud, READY_TIMEOUT).await;
    let mut agent = Proc::start_args(
        "agent",
        Path::new("/usr/bin/setpriv"),
        &as_meshbridge("/usr/bin/edge-agent", &["--config", agent_toml, "run"]),
        logs,
    );
    agent.wait_ready(edge, READY_TIMEOUT).await;
    for proc in [&hub, &agent] {
        let pid = proc.pid().expect("running");
        assert_eq!(uid_of(pid), uid, "{} runs as meshbridge", proc.name());
    }

    // A QoS 1 message from the line to the cloud, under the site's namespace.
    let sub = MosquittoSub::start(cloud, &["-q", "1", "-t", "plant/line3/#"]);
    assert!(
        sub.wait_line("received SUBACK", Duration::from_secs(10))
            .await,
        "no SUBACK from the hub's cloud broker:\n{}",
        sub.transcript()
    );
    let publish = Command::new(client_tool("mosquitto_pub").expect("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &edge.port().to_string()])
        .args(["-q", "1", "-t", "telemetry/robot5/temp", "-m", "21.5"])
        .output()
        .expect("run mosquitto_pub");
    assert!(publish.status.success(), "mosquitto_pub: {publish:?}");
    let wanted = "plant/line3/telemetry/robot5/temp 21.5";
    assert!(
        sub.wait_line(wanted, Duration::from_secs(20)).await,
        "no {wanted:?} at the cloud broker:\n{}\nagent:\n{}\nhub:\n{}",
        sub.transcript(),
        agent.log_text(),
        hub.log_text()
    );
    sub.kill().await;

    // SIGTERM, as `systemctl stop` sends it.
    let status = agent.terminate(STOP_TIMEOUT).await;
    assert!(status.success(), "agent: {status}\n{}", agent.log_text());
    let status = hub.terminate(STOP_TIMEOUT).await;
    assert!(status.success(), "hub: {status}\n{}", hub.log_text());
    // Their state is the service user's, in the state directories.
    for dir in ["/var/lib/meshbridge/agent", "/var/lib/meshbridge/hub"] {
        let entries: Vec<_> = std::fs::read_dir(dir)
            .expect("the state directory")
            .map(|e| e.expect("an entry").path())
            .collect();
        assert!(!entries.is_empty(), "{dir} is empty");
        for entry in entries {
            let (_, owner, _) = stat(&entry.to_string_lossy());
            assert_eq!(owner, "meshbridge", "{}", entry.display());
        }
    }

    // Purge: everything the packages installed or made is gone; the user stays (see the postrm scripts).
    ok("dpkg", &["--purge", PACKAGES[0], PACKAGES[1]]);
    for package in PACKAGES {
        assert!(!installed(package), "{package} still known to dpkg");
    }
    for path in [
        "/usr/bin/edge-agent",
        "/usr/bin/cloud-hub",
        units[0],
        units[1],
        "/etc/meshbridge",
        "/var/lib/meshbridge",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after purge");
    }
    for path in owned.difference(&existed) {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{} (listed by dpkg -L) is left after purge",
            path.display()
        );
    }
    assert!(user_exists("meshbridge"), "purge keeps the system user");
    drop(cleanup);
    eprintln!("{TEST}: took {:?}", started.elapsed());
}

/// `&[String]` as `&[&str]` for [`ok`].
fn as_meshbridge_ref(argv: &[String]) -> Vec<&str> {
    argv.iter().map(String::as_str).collect()
}
