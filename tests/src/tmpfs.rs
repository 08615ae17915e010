//! A small tmpfs mounted for one test, to run the queue (or a whole agent) on a filesystem that fills up.
//! Mounting needs root: check [`crate::prereq::needs_root`] first.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the value's lifetime (lazily unmounted on drop).
#[derive(Debug)]
pub struct Tmpfs {
    /// The mount point.
    pub dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `16m`); `None` if mounting failed.
    pub fn mount(size: &str) -> Option<Self> {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).expect("mkdir");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "meshbridge-test",
            ])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self {
            dir,
            _parent: parent,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes a ballast file at `path` of up to `bytes` (less if the filesystem fills first) and syncs it.
pub fn fill(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("ballast");
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0;
    while written < bytes {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n,
        }
    }
    let _ = f.sync_all();
}
