//! `edge-agent bootstrap BUNDLE`: installs the bundle `cloud-hub site add` wrote (shared/src/bundle.rs) where
//! the Debian package's unit looks for it: `/etc/meshbridge/agent.toml` and `/etc/meshbridge/agent/`.
//!
//! The files are first written to a staging directory beside their destination and the config is loaded
//! from there with every rule (its TLS paths are relative, so it reads the staged certificate and key), so
//! a bundle that does not make a valid agent changes nothing. Then the TLS files and, last, the config are
//! renamed into place.
//!
//! Ownership: the service runs as the unprivileged `meshbridge` user (deploy/debian). When that group
//! exists and we run as root, the key, the config and the TLS directory belong to `root:meshbridge` with no
//! access for others, so the service can read its key and nothing but root can change it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use shared::bundle::{self, Bundle, BundleError, MAX_BUNDLE_BYTES};
use shared::config::ConfigError;

/// The group the package's service runs as.
pub const SERVICE_GROUP: &str = "meshbridge";

/// What to install, and where.
#[derive(Debug, Clone)]
pub struct Bootstrap<'a> {
    /// The bundle file.
    pub bundle: &'a Path,
    /// The config directory (`/etc/meshbridge` for the package).
    pub etc_dir: &'a Path,
    /// Replace the bundle's `data_dir` (the package's `/var/lib/meshbridge/agent`).
    pub state_dir: Option<&'a Path>,
    /// Replace an existing, different `agent.toml` and TLS files.
    pub force: bool,
}

/// What was installed.
#[derive(Debug, Clone)]
pub struct Bootstrapped {
    /// The config written.
    pub config: PathBuf,
    /// The site it is for.
    pub site: String,
    /// The hub it connects to.
    pub hub: String,
    /// The state directory it uses.
    pub data_dir: PathBuf,
    /// An earlier, different config was replaced (`--force`).
    pub replaced: bool,
    /// The files were already exactly these; nothing was written.
    pub unchanged: bool,
}

/// Why `bootstrap` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Not a bundle.
    #[error("{path} is not a meshbridge site bundle")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: BundleError,
    },
    /// The bundle's config has no top-level `data_dir` to move.
    #[error("the bundle's agent.toml has no top-level data_dir line to replace with --state-dir")]
    NoDataDir,
    /// The staged config does not load.
    #[error("the bundle does not make a valid agent config; nothing was installed")]
    Invalid {
        /// Every problem.
        #[source]
        source: ConfigError,
    },
    /// A different config is installed already.
    #[error("{path} exists (site {site}); give --force to replace it")]
    Exists {
        /// The config file.
        path: PathBuf,
        /// The site in it, as far as it loads.
        site: String,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError + '_ {
    move |source| BootstrapError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Installs a bundle: see the module documentation.
///
/// # Errors
/// [`BootstrapError`]; when refused before the renames, the installed files are unchanged.
pub fn install(request: &Bootstrap<'_>) -> Result<Bootstrapped, BootstrapError> {
    let bundle = read_bundle(request.bundle)?;
    let agent_toml = match request.state_dir {
        Some(dir) => bundle::with_data_dir(&bundle.agent_toml, &dir.to_string_lossy())
            .ok_or(BootstrapError::NoDataDir)?,
        None => bundle.agent_toml.clone(),
    };
    let files: [(&str, &str, u32); 4] = [
        (bundle::CA_PEM, &bundle.ca_pem, 0o644),
        (bundle::SITE_PEM, &bundle.site_pem, 0o644),
        (bundle::SITE_KEY, &bundle.site_key, 0o640),
        (bundle::AGENT_TOML, &agent_toml, 0o640),
    ];
    let etc = request.etc_dir;
    let config_path = etc.join(bundle::AGENT_TOML);
    let installed_now = files
        .iter()
        .all(|(name, text, _)| fs::read_to_string(etc.join(name)).ok().as_deref() == Some(*text));
    let exists = config_path.exists();

    fs::create_dir_all(etc).map_err(io(etc))?;
    let group = service_gid();
    let staging = etc.join(".bootstrap");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    let _cleanup = RemoveDirOnDrop(staging.clone());
    fs::create_dir_all(staging.join(bundle::TLS_DIR)).map_err(io(&staging))?;
    for (name, text, mode) in &files {
        write_file(&staging.join(name), text.as_bytes(), *mode, group)?;
    }
    let config = shared::config::load_agent(&staging.join(bundle::AGENT_TOML))
        .map_err(|source| BootstrapError::Invalid { source })?;
    let result = |replaced, unchanged| Bootstrapped {
        config: config_path.clone(),
        site: config.site.clone(),
        hub: config.uplink.hub.to_string(),
        data_dir: config.data_dir.clone(),
        replaced,
        unchanged,
    };
    if installed_now {
        return Ok(result(false, true));
    }
    if exists && !request.force {
        let site = shared::config::load_agent(&config_path)
            .map(|c| c.site)
            .unwrap_or_else(|e| format!("unknown: {e}"));
        return Err(BootstrapError::Exists {
            path: config_path,
            site,
        });
    }

    let tls_dir = etc.join(bundle::TLS_DIR);
    fs::create_dir_all(&tls_dir).map_err(io(&tls_dir))?;
    fs::set_permissions(&tls_dir, fs::Permissions::from_mode(0o750)).map_err(io(&tls_dir))?;
    set_group(&tls_dir, group)?;
    // The config last: until it is renamed, an agent still starts from the previous one.
    for (name, _, _) in &files {
        let to = etc.join(name);
        fs::rename(staging.join(name), &to).map_err(io(&to))?;
    }
    fsync_dir(&tls_dir)?;
    fsync_dir(etc)?;
    Ok(result(exists, false))
}

fn read_bundle(path: &Path) -> Result<Bundle, BootstrapError> {
    let file = fs::File::open(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    // One byte more than the limit, so an oversize file is reported as such rather than cut.
    file.take(MAX_BUNDLE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    Bundle::decode(&bytes).map_err(|source| BootstrapError::Bundle {
        path: path.to_owned(),
        source,
    })
}

fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    group: Option<u32>,
) -> Result<(), BootstrapError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    // The umask may have taken bits `mode` asked for (0o644 under umask 077).
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    set_group(path, group)
}

fn set_group(path: &Path, group: Option<u32>) -> Result<(), BootstrapError> {
    let Some(gid) = group else { return Ok(()) };
    match std::os::unix::fs::chown(path, None, Some(gid)) {
        // Not root: the files stay the installing user's, who is then the one to run the agent.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
        other => other.map_err(io(path)),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), BootstrapError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The gid of [`SERVICE_GROUP`] from `/etc/group`, if the package created it.
fn service_gid() -> Option<u32> {
    gid_in(&fs::read_to_string("/etc/group").ok()?, SERVICE_GROUP)
}

/// The gid of `name` in `/etc/group` text (`name:x:gid:members`).
fn gid_in(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_group_is_read_from_the_group_file() {
        let text = "root:x:0:\nmeshbridgex:x:5:\nmeshbridge:x:998:\n";
        assert_eq!(gid_in(text, "meshbridge"), Some(998));
        assert_eq!(gid_in(text, "nobody"), None);
        assert_eq!(gid_in("meshbridge:x:notanumber:\n", "meshbridge"), None);
    }
}
