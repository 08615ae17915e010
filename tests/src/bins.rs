//! The program binaries under test.
//!
//! `env!("CARGO_BIN_EXE_..")` only exists for a package's own binaries, and the programs live in other
//! packages, so they are found next to the running test instead: a test executable is
//! `target/<profile>/deps/<test>-<hash>`, the binaries are in `target/<profile>/`.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The cloud hub program.
pub const CLOUD_HUB: &str = "cloud-hub";
/// The edge agent program.
pub const EDGE_AGENT: &str = "edge-agent";

/// Path of the workspace binary `name`, built in the same target directory and profile as this test.
///
/// # Panics
/// If the binary is not there: the e2e tests need the programs built first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let mut dir = exe
        .parent()
        .expect("a test executable lives in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does), \
         with the same profile and CARGO_TARGET_DIR as the tests",
        path.display()
    );
    path
}

/// Runs the workspace binary `program` with `args` to its end (a command such as `check-config` or
/// `site add`, not a server), without the caller's `RUST_LOG`.
///
/// # Panics
/// If it cannot be started.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(bin(program))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// A finished command's standard output and standard error, in that order.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
