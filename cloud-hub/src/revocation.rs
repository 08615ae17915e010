//! Following the revocation list (`tls.crl`) while the hub runs: when the file changes, new handshakes are
//! checked against it at once (the endpoint's server configuration is replaced) and the live links of
//! certificates it revokes are closed with `Unauthorized` (issue 11 item 6). A file that does not load is
//! logged and the running list stays: an unreadable CRL must not let revoked sites back in, nor lock
//! everyone out.
//!
//! Polled like the config file (`crate::reload`): one `stat` every [`POLL`] catches editors and
//! `cloud-hub pki revoke`'s rename alike, with no platform watcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::Endpoint;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::agent_conn::Hub;
use crate::crl::{self, LoadedCrl};
use crate::error::HubError;
use crate::tls::{self, ServerTransport};

/// How often the file is checked for changes.
const POLL: Duration = Duration::from_secs(1);

/// The files the hub's QUIC TLS is made of.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    /// CA bundle agents' certificates must chain to.
    pub(crate) ca: PathBuf,
    /// The hub's certificate.
    pub(crate) cert: PathBuf,
    /// Its key.
    pub(crate) key: PathBuf,
    /// The revocation list, if configured.
    pub(crate) crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The server configuration with `crl` (already loaded) as its revocation list.
    pub(crate) fn server_config(
        &self,
        crl: Option<&LoadedCrl>,
    ) -> Result<quinn::ServerConfig, HubError> {
        let crls = crl.map(|c| vec![c.der.clone()]).unwrap_or_default();
        Ok(tls::server_config(
            &self.ca,
            &self.cert,
            &self.key,
            crls,
            &ServerTransport::default(),
        )?)
    }

    /// Loads the configured CRL, if any (at start: an error stops the hub).
    pub(crate) fn load_crl(&self) -> Result<Option<LoadedCrl>, HubError> {
        let Some(path) = &self.crl else {
            return Ok(None);
        };
        let loaded = crl::load(path).map_err(HubError::Crl)?;
        info!(
            crl = %path.display(),
            revoked = loaded.revoked.serials.len(),
            number = loaded.revoked.number,
            "revocation list loaded"
        );
        Ok(Some(loaded))
    }
}

fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Follows `files.crl` until `stop`; does nothing without one.
pub(crate) async fn follow(
    files: TlsFiles,
    endpoint: Endpoint,
    hub: Arc<Hub>,
    stop: CancellationToken,
) {
    let Some(path) = files.crl.clone() else {
        return;
    };
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        let loaded = match crl::load(&path) {
            Ok(loaded) => loaded,
            Err(cause) => {
                error!(crl = %path.display(), %cause, "the revocation list changed but does not load; the running one stays");
                continue;
            }
        };
        let config = match files.server_config(Some(&loaded)) {
            Ok(config) => config,
            Err(cause) => {
                error!(crl = %path.display(), %cause, "cannot build the TLS configuration with the new revocation list; the running one stays");
                continue;
            }
        };
        if stop.is_cancelled() {
            // Shutting down: the endpoint's server configuration has been (or is being) withdrawn.
            return;
        }
        endpoint.set_server_config(Some(config));
        let closed = hub.close_revoked(&loaded.revoked);
        let revoked = loaded.revoked.serials.len();
        if closed > 0 {
            warn!(crl = %path.display(), revoked, closed, "revocation list reloaded; closing the links of revoked certificates");
        } else {
            info!(crl = %path.display(), revoked, "revocation list reloaded");
        }
    }
}
