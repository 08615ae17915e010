//! An embedded broker's client ports from its config section: the main `listen` and any further
//! `[[broker.listeners]]`, each plain or TLS (`meshbridge_tls::server`, certificates re-read on change),
//! each with its own anonymous rule over the broker's shared users and ACL (`crate::auth`). The agent's
//! site broker and the hub's cloud broker both open their ports here.

use std::net::SocketAddr;
use std::sync::Arc;

use shared::config::{EmbeddedBroker, ServerTls};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::auth::{Auth, AuthError};
use crate::front::Listener;

/// Why the ports cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A port cannot be bound.
    #[error("cannot listen for MQTT clients on {addr}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// A port's TLS files cannot be used.
    #[error("TLS for the MQTT port {addr}")]
    Tls {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: meshbridge_tls::TlsError,
    },
    /// The password or ACL file cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The opened ports: the first is `listen`'s.
pub struct Opened {
    /// For the front (`front::serve_listeners`).
    pub listeners: Vec<Listener>,
    /// Their bound addresses, in the same order.
    pub addrs: Vec<SocketAddr>,
    /// The shared users and ACL, if any port checks them: its `reload_loop` keeps them current.
    pub auth: Option<Arc<Auth>>,
}

/// Binds every port of `cfg`. `default_anonymous` is whether a port whose `allow_anonymous` is unset
/// (and the broker's too) lets anonymous clients in; refusals are counted in `counters`.
///
/// # Errors
/// [`ListenError`] for a port that cannot be bound, unusable TLS files, or unusable auth files.
pub async fn open(
    cfg: &EmbeddedBroker,
    default_anonymous: bool,
    counters: Arc<crate::auth::AuthCounters>,
) -> Result<Opened, ListenError> {
    let ports = std::iter::once((cfg.listen, cfg.tls.as_ref(), cfg.allow_anonymous)).chain(
        cfg.listeners.iter().map(|l| {
            (
                l.listen,
                l.tls.as_ref(),
                l.allow_anonymous.or(cfg.allow_anonymous),
            )
        }),
    );
    let checked = cfg.password_file.is_some()
        || cfg.acl_file.is_some()
        || cfg.allow_anonymous.is_some()
        || cfg.listeners.iter().any(|l| l.allow_anonymous.is_some())
        || cfg
            .tls
            .iter()
            .chain(cfg.listeners.iter().filter_map(|l| l.tls.as_ref()))
            .any(|t| t.client_ca.is_some());
    let base = if checked {
        Some(Arc::new(Auth::load(
            cfg.password_file.as_deref(),
            cfg.acl_file.as_deref(),
            cfg.allow_anonymous.unwrap_or(default_anonymous),
            counters,
        )?))
    } else {
        None
    };
    let mut opened = Opened {
        listeners: Vec::new(),
        addrs: Vec::new(),
        auth: base.clone(),
    };
    for (addr, tls, anonymous) in ports {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError::Bind { addr, source })?;
        let bound = tcp
            .local_addr()
            .map_err(|source| ListenError::Bind { addr, source })?;
        let acceptor = tls
            .map(|tls| acceptor(tls, bound))
            .transpose()
            .map_err(|source| ListenError::Tls { addr, source })?;
        let auth = base
            .as_ref()
            .map(|b| Arc::new(b.for_listener(anonymous.unwrap_or(default_anonymous))));
        info!(
            listen = %bound,
            tls = tls.is_some(),
            client_certificates = tls.is_some_and(|t| t.client_ca.is_some()),
            anonymous = auth.as_ref().is_none_or(|a| a.allows_anonymous()),
            "MQTT port open"
        );
        opened.listeners.push(Listener {
            tcp,
            tls: acceptor,
            auth,
        });
        opened.addrs.push(bound);
    }
    Ok(opened)
}

fn acceptor(
    tls: &ServerTls,
    port: SocketAddr,
) -> Result<tokio_rustls::TlsAcceptor, meshbridge_tls::TlsError> {
    let files = meshbridge_tls::server::ServerFiles {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        client_ca: tls.client_ca.clone(),
    };
    let hook: meshbridge_tls::server::ReloadHook = Arc::new(move |outcome| match outcome {
        Ok(cert) => info!(%port, cert = %cert.display(), "TLS certificate reloaded"),
        Err(e) => {
            warn!(%port, cause = %e, "the changed TLS certificate cannot be used; the running one stays")
        }
    });
    let config = meshbridge_tls::server::mqtt_server_config(&files, hook)?;
    Ok(tokio_rustls::TlsAcceptor::from(config))
}
