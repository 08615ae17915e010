//! Issue 13 item 2, container images: `deploy/container/build.sh --profile debug` builds both images from
//! the debug binaries the other tests use (CI pays for no release build), into a throwaway podman store,
//! and the images are checked for what `podman image inspect` shows (entrypoint, command, user 10001, the
//! data volume, the health check, the hub's QUIC port, labels) and for what they hold: the one layer lists
//! exactly the binary, the libraries `ldd` names for it (the loader included), /etc/passwd and /etc/group
//! and the empty data directory owned by 10001, and the image is no larger than those files plus 1 MiB.
//! The staged root is then run under `chroot` (as root), which proves the library set is complete without
//! a container runtime (running containers fails on cgroups in CI's sandbox).
//!
//! Needs podman (scripts/install-test-deps.sh installs it) and root (the layer is read with `podman image
//! mount`, and `chroot`): under `CI=true` a missing one fails, elsewhere the test says loudly it skipped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, CLOUD_HUB, EDGE_AGENT};
use meshbridge_tests::prereq;

const TEST: &str = "images";
/// Both images take about 3 s to build here (staging, one `COPY` layer each, vfs); this bounds a hung
/// podman, not the normal run.
const BUILD_TIMEOUT: Duration = Duration::from_secs(180);
const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);
/// What the image may hold beyond its files' bytes: tar headers, the config, the manifest.
const SLACK: u64 = 1024 * 1024;
const UID: u32 = 10001;

/// Runs `command` to completion, killing it after `timeout`.
fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {shown}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block on a full pipe while we wait.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut buf);
        buf
    });
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// podman on the throwaway store that `build.sh --storage-root` made (the same flags it uses).
fn podman(store: &Path) -> Command {
    let mut command = Command::new("podman");
    command
        .arg("--root")
        .arg(store.join("storage"))
        .arg("--runroot")
        .arg(store.join("run"))
        .arg("--tmpdir")
        .arg(store.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--events-backend",
            "file",
            "--cgroup-manager",
            "cgroupfs",
        ]);
    command
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_path_buf()
}

/// The absolute paths `ldd` names for `binary`: its libraries and the dynamic loader.
fn libraries(binary: &Path) -> BTreeSet<String> {
    let out = ok(
        run_bounded(Command::new("ldd").arg(binary), PODMAN_TIMEOUT),
        "ldd",
    );
    let mut libs = BTreeSet::new();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [_, "=>", path, ..] if path.starts_with('/') => libs.insert((*path).to_owned()),
            [path, ..] if path.starts_with('/') => libs.insert((*path).to_owned()),
            _ => false,
        };
    }
    assert!(
        libs.iter().any(|l| l.contains("libc.so")),
        "ldd named no libc: {out}"
    );
    libs
}

/// Every path under `root` (relative, with a leading `/`), its kind, owner and size.
fn walk(root: &Path) -> Vec<(String, char, u32, u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the layer") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let kind = if meta.is_dir() {
                stack.push(path.clone());
                'd'
            } else if meta.is_file() {
                'f'
            } else {
                'o'
            };
            let rel = format!(
                "/{}",
                path.strip_prefix(root).expect("under root").display()
            );
            found.push((rel, kind, meta.uid(), meta.gid(), meta.len()));
        }
    }
    found.sort();
    found
}

/// Checks one built image; returns its size.
fn check_image(store: &Path, staging: &Path, program: &str, tag: &str) -> u64 {
    let image = format!("meshbridge/{program}:{tag}");
    let inspected = ok(
        run_bounded(
            podman(store).args(["image", "inspect", &image]),
            PODMAN_TIMEOUT,
        ),
        "podman image inspect",
    );
    let inspected: serde_json::Value = serde_json::from_str(&inspected).expect("inspect JSON");
    let image_json = &inspected[0];
    let config = &image_json["Config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("{program}: not a list: {v}"))
            .iter()
            .map(|s| s.as_str().expect("a string").to_owned())
            .collect()
    };
    let binary = format!("/usr/bin/{program}");
    let (cmd, health): (&[&str], Vec<&str>) = if program == CLOUD_HUB {
        (
            &["run", "--config", "/etc/meshbridge/hub.toml"],
            vec![
                "CMD",
                &binary,
                "health",
                "--config",
                "/etc/meshbridge/hub.toml",
            ],
        )
    } else {
        (
            &["--config", "/etc/meshbridge/agent.toml", "run"],
            vec![
                "CMD",
                &binary,
                "--config",
                "/etc/meshbridge/agent.toml",
                "health",
            ],
        )
    };
    assert_eq!(
        strings(&config["Entrypoint"]),
        [binary.as_str()],
        "{program}"
    );
    assert_eq!(strings(&config["Cmd"]), cmd, "{program}");
    assert_eq!(config["User"], format!("{UID}:{UID}"), "{program}");
    let volumes: Vec<&String> = config["Volumes"]
        .as_object()
        .expect("volumes")
        .keys()
        .collect();
    assert_eq!(volumes, ["/var/lib/meshbridge"], "{program}");
    // The health check survives only in the docker format (`--format docker`).
    let check = &image_json["Healthcheck"];
    assert_eq!(strings(&check["Test"]), health, "{program}: {image_json}");
    // Longer than the probe's own 2 s, so a slow answer is reported by the probe, with its reason.
    assert!(
        check["Timeout"].as_u64() >= Some(3_000_000_000),
        "{program}: {check}"
    );
    let ports: Vec<&String> = config["ExposedPorts"]
        .as_object()
        .map(|p| p.keys().collect())
        .unwrap_or_default();
    if program == CLOUD_HUB {
        assert_eq!(ports, ["4433/udp"], "{program}");
    } else {
        assert!(ports.is_empty(), "{program}: {ports:?}");
    }
    let labels = &config["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], program);
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    let layers = image_json["RootFS"]["Layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{program}: one layer: {layers:?}");

    // What the layer holds: mount it (vfs: a plain directory) and list it.
    let mounted = ok(
        run_bounded(
            podman(store).args(["image", "mount", &image]),
            PODMAN_TIMEOUT,
        ),
        "podman image mount",
    );
    let files = walk(Path::new(mounted.trim()));
    let _ = run_bounded(
        podman(store).args(["image", "unmount", &image]),
        PODMAN_TIMEOUT,
    );
    let libs = libraries(&bin(program));
    let mut expected: BTreeSet<String> = libs.clone();
    expected.extend([binary.clone(), "/etc/passwd".into(), "/etc/group".into()]);
    // The directories on the way to those files, and the data directory with its parents.
    let mut dirs = BTreeSet::from(["/var/lib/meshbridge", "/var/lib", "/var"].map(String::from));
    for file in &expected {
        let mut dir = Path::new(file).parent();
        while let Some(d) = dir.filter(|d| *d != Path::new("/")) {
            dirs.insert(d.display().to_string());
            dir = d.parent();
        }
    }
    let listed_files: BTreeSet<String> = files
        .iter()
        .filter(|f| f.1 != 'd')
        .map(|f| f.0.clone())
        .collect();
    let listed_dirs: BTreeSet<String> = files
        .iter()
        .filter(|f| f.1 == 'd')
        .map(|f| f.0.clone())
        .collect();
    assert_eq!(listed_files, expected, "{program}: files in the image");
    assert_eq!(listed_dirs, dirs, "{program}: directories in the image");
    for (path, kind, uid, gid, _) in &files {
        let owner = if path == "/var/lib/meshbridge" {
            UID
        } else {
            0
        };
        assert_eq!(
            (*uid, *gid),
            (owner, owner),
            "{program}: owner of {path} ({kind})"
        );
    }
    let rootfs = staging.join(program).join("rootfs");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("passwd");
    assert_eq!(
        passwd,
        format!("meshbridge:x:{UID}:{UID}:meshbridge:/var/lib/meshbridge:/sbin/nologin\n")
    );
    let group = std::fs::read_to_string(rootfs.join("etc/group")).expect("group");
    assert_eq!(group, format!("meshbridge:x:{UID}:\n"));

    // Minimal: the image's size is its files' bytes and little else.
    let content: u64 = files.iter().filter(|f| f.1 != 'd').map(|f| f.4).sum();
    let size = image_json["Size"].as_u64().expect("size");
    assert!(
        size <= content + SLACK,
        "{program}: image {size} bytes, its files {content} bytes"
    );
    eprintln!("{program}: image {size} bytes; binary and libraries {content} bytes; {libs:?}");

    // The library set is complete: the staged root runs the binary with nothing from the host.
    let out = run_bounded(
        Command::new("chroot")
            .arg("--userspec=10001:10001")
            .arg(&rootfs)
            .args([binary.as_str(), "--version"]),
        PODMAN_TIMEOUT,
    );
    let version = ok(out, "chroot --version");
    assert_eq!(
        version.trim(),
        format!("{program} {}", env!("CARGO_PKG_VERSION"))
    );
    size
}

#[test]
fn images_hold_the_binary_its_libraries_and_nothing_else() {
    let podman_here = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if prereq::missing(
        TEST,
        podman_here,
        "podman is not installed",
        "bash scripts/install-test-deps.sh, or apt-get install --no-install-recommends podman",
    ) || prereq::needs_root(
        TEST,
        "read the image's layer (podman image mount) and chroot into the staged root",
    ) {
        return;
    }
    // The binaries the other tests use: target/<profile>/, told to build.sh as CARGO_TARGET_DIR + profile.
    let agent = bin(EDGE_AGENT);
    let profile_dir = agent.parent().expect("target/<profile>");
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .expect("profile name")
        .to_owned();
    let target_dir = profile_dir.parent().expect("target dir");

    let work = tempfile::tempdir().expect("tempdir");
    let store = work.path().join("store");
    let staging = work.path().join("staging");
    let tag = "ci-test";
    let started = Instant::now();
    let out = run_bounded(
        Command::new("bash")
            .arg(repo_root().join("deploy/container/build.sh"))
            .args(["--profile", &profile, "--tag", tag, "--storage-root"])
            .arg(&store)
            .arg("--staging")
            .arg(&staging)
            .env("CARGO_TARGET_DIR", target_dir),
        BUILD_TIMEOUT,
    );
    let built = ok(out, "deploy/container/build.sh");
    eprintln!("built in {:?}:\n{built}", started.elapsed());
    for program in [EDGE_AGENT, CLOUD_HUB] {
        assert!(
            built.contains(&format!("image meshbridge/{program}:{tag} ")),
            "{built}"
        );
        check_image(&store, &staging, program, tag);
    }
    // Nothing is left mounted or running in the throwaway store; remove the images so the vfs copies go.
    let _ = run_bounded(
        podman(&store).args(["rmi", "--all", "--force"]),
        PODMAN_TIMEOUT,
    );
    eprintln!("{TEST}: {:?} in all", started.elapsed());
}
