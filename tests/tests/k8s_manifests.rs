//! Issue 13 item 3, Kubernetes manifests for the hub (`deploy/k8s/`):
//!
//! - every file there validates with PyPI's `kubernetes-validate --strict` (the schema of a pinned
//!   Kubernetes version; unknown fields are errors), the Secret template included;
//! - the ConfigMap's hub.toml is a valid hub config (`cloud-hub check-config` as shipped), and a hub started
//!   on it, its `/etc/meshbridge` and `/var/lib/meshbridge` moved into a temp dir and filled with a real PKI
//!   and password file (as the Secret would be), becomes healthy: the file names the config, the
//!   StatefulSet's projected volume and the Secret template use agree.
//!
//! `kubernetes-validate` (run as `python3 -m kubernetes_validate`) comes from scripts/install-test-deps.sh,
//! which pins its version; when it is missing, the validation test fails under `CI=true` and says loudly
//! that it skipped elsewhere. The config test needs only the binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, CLOUD_HUB, EDGE_AGENT};
use meshbridge_tests::mesh::{READY_TIMEOUT, STOP_TIMEOUT};
use meshbridge_tests::net::{free_tcp, free_udp};
use meshbridge_tests::prereq;
use meshbridge_tests::process::Proc;

/// The Kubernetes version the manifests are validated against: the oldest still common in managed
/// clusters when this was written, so no field newer than it slips in.
const KUBERNETES_VERSION: &str = "1.33.0";
/// The files of deploy/k8s, in the order `kubectl apply -f deploy/k8s/` takes them, and the template.
const MANIFESTS: [&str; 5] = [
    "00-namespace.yaml",
    "10-configmap.yaml",
    "20-statefulset.yaml",
    "30-services.yaml",
    "secret.yaml.template",
];
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(120);

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .join("deploy")
        .join("k8s")
}

fn read(name: &str) -> String {
    let path = k8s_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs `command`, killing it after `timeout`.
fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {shown}: {e}"));
    let pid = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match waited.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {shown}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{shown} did not finish within {timeout:?}");
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of the ConfigMap's `hub.toml: |` block: the lines indented deeper than the key, unindented.
fn configmap_hub_toml() -> String {
    let yaml = read("10-configmap.yaml");
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "hub.toml: |");
    let key = lines
        .next()
        .expect("10-configmap.yaml has a `hub.toml: |` block");
    let key_indent = key.len() - key.trim_start().len();
    let block: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent)
        .collect();
    let indent = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .expect("hub.toml is not empty");
    let mut toml = String::new();
    for line in block {
        toml.push_str(line.get(indent..).unwrap_or(""));
        toml.push('\n');
    }
    toml
}

#[test]
fn manifests_validate_against_the_pinned_kubernetes_schema() {
    let test = "k8s_manifests::manifests_validate_against_the_pinned_kubernetes_schema";
    let here = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if prereq::missing(
        test,
        here,
        "kubernetes-validate is not installed",
        "bash scripts/install-test-deps.sh, or python3 -m pip install kubernetes-validate==1.37.0",
    ) {
        return;
    }
    let mut files: Vec<String> = std::fs::read_dir(k8s_dir())
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, MANIFESTS, "deploy/k8s holds exactly these files");
    let started = Instant::now();
    let out = run_bounded(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict"])
            .args(["--kubernetes-version", KUBERNETES_VERSION])
            .args(files.iter().map(|f| k8s_dir().join(f))),
        VALIDATE_TIMEOUT,
    );
    let report = text(&out);
    eprintln!("kubernetes-validate ({:?}):\n{report}", started.elapsed());
    assert!(out.status.success(), "{report}");
    // One line per resource; a file it could not read as a resource would say something else.
    let expected = [
        "namespace/meshbridge",
        "configmap/cloud-hub",
        "statefulset/cloud-hub",
        "service/cloud-hub-quic",
        "service/cloud-hub ",
        "service/cloud-hub-headless",
        "secret/cloud-hub-tls",
    ];
    for resource in expected {
        assert!(
            report
                .lines()
                .any(|l| l.contains("passed for resource") && l.contains(resource)),
            "{resource} was not validated:\n{report}"
        );
    }
    assert_eq!(
        report.matches("passed for resource").count(),
        expected.len(),
        "{report}"
    );
}

/// The ConfigMap's config, the StatefulSet's mounts and the Secret template name the same files, and a hub
/// runs on that config once the files are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmap_config_is_valid_and_a_hub_runs_on_it() {
    let toml = configmap_hub_toml();
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = dir.path().join("shipped.toml");
    std::fs::write(&shipped, &toml).expect("write");
    let out = Command::new(bin(CLOUD_HUB))
        .args(["check-config", "--config"])
        .arg(&shipped)
        .output()
        .expect("run cloud-hub check-config");
    assert!(out.status.success(), "{}", text(&out));

    // Every file the config reads is mounted by the StatefulSet and is a key of the Secret template.
    let statefulset = read("20-statefulset.yaml");
    let secret = read("secret.yaml.template");
    let paths: Vec<&str> = toml
        .split('"')
        .filter(|s| s.starts_with("/etc/meshbridge/"))
        .collect();
    assert_eq!(paths.len(), 5, "{paths:?}");
    for path in &paths {
        let rel = path.trim_start_matches("/etc/meshbridge/");
        let key = Path::new(rel)
            .file_name()
            .and_then(|k| k.to_str())
            .expect("a file name");
        assert!(
            statefulset.contains(&format!("- key: {key}\n"))
                && statefulset.contains(&format!("path: {rel}\n")),
            "{path} is not mounted from key {key} by 20-statefulset.yaml"
        );
        assert!(
            secret.contains(&format!("\n  {key}: |\n"))
                && secret.contains(&format!("--from-file={key}=")),
            "{key} is not in secret.yaml.template"
        );
    }
    assert!(statefulset.contains("mountPath: /etc/meshbridge\n"));
    assert!(statefulset.contains("mountPath: /var/lib/meshbridge\n"));
    assert!(toml.contains("data_dir = \"/var/lib/meshbridge/"), "{toml}");
    for port in ["4433", "1883", "9600"] {
        assert!(
            toml.contains(&format!("\"0.0.0.0:{port}\"")),
            "{port}: {toml}"
        );
        assert!(
            statefulset.contains(&format!("containerPort: {port}\n")),
            "{port} is not a container port"
        );
    }
    assert!(toml.contains("allow_anonymous = false"), "{toml}");

    // The pod's filesystem in a temp dir: the config's absolute paths moved under it, free ports, and the
    // files the Secret carries made as the README says (pki init, pki crl, a password file).
    let root = dir.path().join("pod");
    let etc = root.join("etc/meshbridge");
    let pki = etc.join("pki");
    let metrics = free_tcp();
    let moved = toml
        .replace("\"/etc/meshbridge/", &format!("\"{}/", etc.display()))
        .replace(
            "\"/var/lib/meshbridge/",
            &format!("\"{}/var/lib/meshbridge/", root.display()),
        )
        .replace("\"0.0.0.0:4433\"", &format!("\"{}\"", free_udp()))
        .replace("\"0.0.0.0:1883\"", &format!("\"{}\"", free_tcp()))
        .replace(
            "\"0.0.0.0:9600\"",
            &format!("\"0.0.0.0:{}\"", metrics.port()),
        );
    std::fs::create_dir_all(etc.join("secret")).expect("mkdir");
    let config = etc.join("hub.toml");
    std::fs::write(&config, &moved).expect("write hub.toml");
    for args in [vec!["pki", "init", "--dir"], vec!["pki", "crl", "--dir"]] {
        let out = Command::new(bin(CLOUD_HUB))
            .args(&args)
            .arg(&pki)
            .output()
            .expect("run cloud-hub pki");
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let out = Command::new(bin(EDGE_AGENT))
        .arg("passwd")
        .arg(etc.join("secret/cloud-broker.passwd"))
        .args([
            "consumer",
            "--password",
            "consumer-secret",
            "--iterations",
            "1000",
        ])
        .output()
        .expect("run edge-agent passwd");
    assert!(out.status.success(), "{}", text(&out));
    for path in &paths {
        let moved_path = etc.join(path.trim_start_matches("/etc/meshbridge/"));
        assert!(
            moved_path.is_file(),
            "{} was not made",
            moved_path.display()
        );
    }
    let out = Command::new(bin(CLOUD_HUB))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run cloud-hub check-config");
    assert!(out.status.success(), "{}", text(&out));

    let mut hub = Proc::start_args(
        "hub",
        &bin(CLOUD_HUB),
        &[
            "run".to_owned(),
            "--config".to_owned(),
            config.to_string_lossy().into_owned(),
        ],
        dir.path(),
    );
    // The config logs JSON, so the readiness line is not the text one: wait for the metrics port instead,
    // as the pod's readiness probe does.
    hub.wait_ready(metrics, READY_TIMEOUT).await;
    // What the pod's probes and the image's HEALTHCHECK ask.
    let out = Command::new(bin(CLOUD_HUB))
        .args(["health", "--config"])
        .arg(&config)
        .output()
        .expect("run cloud-hub health");
    assert!(out.status.success(), "{}\n{}", text(&out), hub.log_text());
    let status = hub.terminate(STOP_TIMEOUT).await;
    assert!(status.success(), "{status}\n{}", hub.log_text());
    assert!(
        root.join("var/lib/meshbridge/hub").is_dir(),
        "the hub made its data_dir on the volume"
    );
}
