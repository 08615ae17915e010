//! Prerequisites that are not built by cargo (root, Mosquitto, a system tool), and the one rule for a test
//! that finds one missing: under `CI=true` the test **fails** (CI installs and provides everything, so a
//! missing piece there is a broken pipeline, not a reason to pass); anywhere else it prints a loud
//! `SKIPPED` line that says what is missing and how to get it, and the caller returns early.
//!
//! A skipped test still shows as passed in cargo's summary, which is why the line is loud, why it is also
//! listed at the end of `scripts/test.sh`'s run (`TEST_MESHBRIDGE_SKIP_LOG`), and why CI does not allow it.

use std::process::Command;

/// Whether this run is CI's (`CI=true`, as CI systems set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// `true` when `test` must skip because `what` is missing: `if prereq::missing(..) { return; }`.
///
/// # Panics
/// When the prerequisite is missing and [`in_ci`]: a CI run never passes a test it did not run.
pub fn missing(test: &str, available: bool, what: &str, remedy: &str) -> bool {
    if available {
        return false;
    }
    assert!(
        !in_ci(),
        "{test}: prerequisite missing under CI=true: {what} ({remedy})"
    );
    skipped(
        test,
        &format!("{what} ({remedy}). This test did NOT run; CI=true makes it fail instead."),
    );
    true
}

/// Says loudly that `test` did not run and why, on stderr and in the list `scripts/test.sh` prints at the
/// end of the run.
pub fn skipped(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}");
    eprintln!("\n*** {line} ***\n");
    // cargo's harness shows a passing test's output only with --nocapture, so the line also goes to the
    // file scripts/test.sh names and prints after the run.
    if let Some(path) = std::env::var_os(SKIP_LOG) {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// The environment variable naming the file skipped tests are listed in (set by scripts/test.sh). Not
/// `MESHBRIDGE_*`: the programs read every such variable as a config key.
pub const SKIP_LOG: &str = "TEST_MESHBRIDGE_SKIP_LOG";

/// Whether this process runs as root (tmpfs mounts, network namespaces and firewall rules need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `true` when `test` must skip because it needs root; see [`missing`].
pub fn needs_root(test: &str, why: &str) -> bool {
    missing(
        test,
        is_root(),
        &format!("root is needed to {why}"),
        "run the tests as root, as CI does",
    )
}
