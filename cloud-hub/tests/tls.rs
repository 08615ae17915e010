//! Mutual TLS over QUIC on loopback: the hub accepts exactly the site certificates issued by its CA and reads the
//! site's identity from them; everything else is refused during the handshake.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cloud_hub::pki::{self, Ca, PkiPaths, SiteCertPaths, SiteId, Validity};
use cloud_hub::tls::{self, ServerTransport};
use edge_agent::tls::{client_config, ClientTransport};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, Endpoint};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

/// Upper bound for every test: loopback handshakes take milliseconds, so hitting this means a hang.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);
const PAYLOAD: &[u8] = b"meshbridge echo payload";

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

/// What the server saw of one connection attempt.
#[derive(Debug)]
enum Served {
    /// The handshake succeeded, the identity was read and one bidi stream was echoed.
    Echoed {
        /// Identity from the client certificate.
        site: SiteId,
        /// ALPN protocol the handshake settled on.
        alpn: Option<Vec<u8>>,
    },
    /// The handshake failed: no connection was ever handed to the hub.
    Refused(ConnectionError),
}

struct Hub {
    _dir: tempfile::TempDir,
    paths: PkiPaths,
    endpoint: Endpoint,
    addr: SocketAddr,
}

impl Hub {
    fn start() -> anyhow::Result<Self> {
        Self::start_revoking(&[])
    }

    /// A hub whose CRL (in its PKI directory) revokes every certificate of `sites`, issued before it starts.
    fn start_revoking(sites: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let paths = pki::init(dir.path(), &[])?;
        for site in sites {
            pki::issue_site(dir.path(), site, Duration::from_secs(3600))?;
            let site = SiteId::new(site)?;
            cloud_hub::crl::revoke_site(dir.path(), &site, OffsetDateTime::now_utc())?;
        }
        let crl = cloud_hub::crl::load(&dir.path().join(cloud_hub::crl::CRL_FILE))?;
        let config = tls::server_config(
            &paths.ca_cert,
            &paths.hub_cert,
            &paths.hub_key,
            vec![crl.der],
            &ServerTransport::default(),
        )?;
        let endpoint = Endpoint::server(config, "127.0.0.1:0".parse()?)?;
        let addr = endpoint.local_addr()?;
        Ok(Self {
            _dir: dir,
            paths,
            endpoint,
            addr,
        })
    }

    fn dir(&self) -> &Path {
        self.paths
            .ca_cert
            .parent()
            .expect("CA file is inside the PKI dir")
    }

    fn issue(&self, site: &str, validity: Validity) -> anyhow::Result<SiteCertPaths> {
        Ok(pki::issue_site_with_validity(self.dir(), site, validity)?)
    }

    /// Accepts one connection attempt and, if it completes, echoes one bidi stream back.
    async fn serve_one(endpoint: Endpoint) -> anyhow::Result<Served> {
        let incoming = endpoint.accept().await.context("endpoint closed")?;
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(err) => return Ok(Served::Refused(err)),
        };
        let site = tls::site_identity(&conn)?;
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        let (mut send, mut recv) = conn.accept_bi().await?;
        let data = recv.read_to_end(1 << 20).await?;
        send.write_all(&data).await?;
        send.finish()?;
        // The client closes once it has read the echo; dropping earlier could discard unsent data.
        conn.closed().await;
        Ok(Served::Echoed { site, alpn })
    }

    /// Runs one client attempt against one server accept, concurrently.
    async fn attempt(
        &self,
        client: quinn::ClientConfig,
        server_name: &str,
    ) -> (anyhow::Result<Served>, anyhow::Result<Vec<u8>>) {
        let server = tokio::spawn(Self::serve_one(self.endpoint.clone()));
        let client = echo_client(client, self.addr, server_name).await;
        let served = server.await.context("server task panicked").and_then(|r| r);
        (served, client)
    }
}

/// Connects, sends [`PAYLOAD`] on a bidi stream and returns what came back.
async fn echo_client(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> anyhow::Result<Vec<u8>> {
    let endpoint = Endpoint::client("127.0.0.1:0".parse()?)?;
    let result = async {
        let conn = endpoint
            .connect_with(config, addr, server_name)?
            .await
            .context("connect")?;
        let (mut send, mut recv) = conn.open_bi().await.context("open_bi")?;
        send.write_all(PAYLOAD).await.context("write")?;
        send.finish()?;
        let echoed = recv.read_to_end(1 << 20).await.context("read")?;
        conn.close(0u32.into(), b"done");
        anyhow::Ok(echoed)
    }
    .await;
    endpoint.wait_idle().await;
    result
}

fn agent_config(ca: &Path, site: &SiteCertPaths) -> quinn::ClientConfig {
    client_config(
        ca,
        &site.cert,
        &site.key,
        &ClientTransport::default(),
        Arc::new(|_| {}),
    )
    .expect("valid agent config")
}

/// A client config trusting `ca` that presents no certificate at all (not constructible with the agent API).
fn no_cert_config(ca: &Path, alpn: &[u8]) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA cert");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("QUIC suites"),
    ))
}

fn window(from_now_days: i64, to_now_days: i64) -> Validity {
    let now = OffsetDateTime::now_utc();
    Validity::new(
        now + time::Duration::days(from_now_days),
        now + time::Duration::days(to_now_days),
    )
    .expect("valid window")
}

/// TLS alerts (RFC 8446 §6) the refusals below are expected to carry.
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_CERTIFICATE_REVOKED: u8 = 44;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// The TLS alert inside a QUIC crypto error (transport codes 0x100..=0x1ff), if `err` is one.
fn tls_alert(err: &ConnectionError) -> Option<u8> {
    let code = match err {
        ConnectionError::ConnectionClosed(close) => close.error_code,
        ConnectionError::TransportError(e) => e.code,
        _ => return None,
    };
    u8::try_from(u64::from(code).checked_sub(0x100)?).ok()
}

/// The refusal contract: the hub never hands out a connection, and the client cannot complete a stream exchange;
/// both ends see the handshake fail with `alert`.
fn assert_refused(
    label: &str,
    alert: u8,
    served: anyhow::Result<Served>,
    client: anyhow::Result<Vec<u8>>,
) {
    match served {
        Ok(Served::Refused(err)) => {
            assert_eq!(tls_alert(&err), Some(alert), "{label}: server saw {err}")
        }
        other => panic!("{label}: server should refuse the handshake, got {other:?}"),
    }
    // With TLS 1.3 the client may finish its handshake before the hub has checked the certificate, so the
    // failure can surface at connect or at the first stream operation.
    let err = client.expect_err(&format!("{label}: client exchange must fail"));
    let conn_err = err
        .chain()
        .find_map(|e| e.downcast_ref::<ConnectionError>())
        .unwrap_or_else(|| panic!("{label}: client failure is not a connection error: {err:#}"));
    assert_eq!(
        tls_alert(conn_err),
        Some(alert),
        "{label}: client saw {err:#}"
    );
}

#[tokio::test]
async fn good_site_cert_gives_identity_and_echoes() {
    bounded(async {
        let hub = Hub::start().expect("hub");
        for (site, server_name) in [
            ("line1", "localhost"),
            ("plant-1.line_2", "hub.meshbridge.local"),
        ] {
            let certs = hub.issue(site, window(-1, 1)).expect("issue");
            let (served, client) = hub
                .attempt(agent_config(&hub.paths.ca_cert, &certs), server_name)
                .await;
            match served.expect("server ok") {
                Served::Echoed { site: id, alpn } => {
                    assert_eq!(id, site);
                    assert_eq!(alpn.as_deref(), Some(tls::ALPN));
                    assert_eq!(tls::ALPN, edge_agent::tls::ALPN);
                }
                Served::Refused(err) => panic!("{site}: refused: {err}"),
            }
            assert_eq!(client.expect("client exchange"), PAYLOAD, "{site}");
        }
    })
    .await;
}

/// A certificate the hub's CRL names is refused at the handshake (issue 11 item 6); a certificate issued
/// to the same site afterwards, and another site's, are accepted.
#[tokio::test]
async fn revoked_cert_is_refused_and_a_new_one_accepted() {
    bounded(async {
        let hub = Hub::start_revoking(&["line1"]).expect("hub");
        let site = SiteId::new("line1").expect("name");
        let revoked = SiteCertPaths::in_dir(hub.dir(), &site);
        let (served, client) = hub
            .attempt(agent_config(&hub.paths.ca_cert, &revoked), "localhost")
            .await;
        assert_refused("revoked", ALERT_CERTIFICATE_REVOKED, served, client);
        for name in ["line1", "line2"] {
            let fresh = hub.issue(name, window(-1, 1)).expect("issue");
            let (served, client) = hub
                .attempt(agent_config(&hub.paths.ca_cert, &fresh), "localhost")
                .await;
            assert!(
                matches!(served, Ok(Served::Echoed { ref site, .. }) if site == name),
                "{name}: {served:?}"
            );
            assert_eq!(client.expect("client exchange"), PAYLOAD);
        }
    })
    .await;
}

#[tokio::test]
async fn cert_from_another_ca_is_refused() {
    bounded(async {
        let hub = Hub::start().expect("hub");
        let other_dir = tempfile::tempdir().expect("tempdir");
        let intruder = Ca::generate("intruder CA", window(-1, 365)).expect("other CA");
        let site = SiteId::new("line1").expect("name");
        let certs = SiteCertPaths::in_dir(other_dir.path(), &site);
        intruder
            .issue_site(&site, window(-1, 1))
            .expect("issue")
            .write(&certs.cert, &certs.key)
            .expect("write");
        // The client trusts the real hub; only its own certificate is foreign.
        let (served, client) = hub
            .attempt(agent_config(&hub.paths.ca_cert, &certs), "localhost")
            .await;
        assert_refused("other CA", ALERT_UNKNOWN_CA, served, client);
    })
    .await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_certs_are_refused() {
    bounded(async {
        let hub = Hub::start().expect("hub");
        for (label, validity) in [("expired", window(-2, -1)), ("not yet valid", window(1, 2))] {
            let certs = hub.issue("line1", validity).expect("issue");
            let (served, client) = hub
                .attempt(agent_config(&hub.paths.ca_cert, &certs), "localhost")
                .await;
            assert_refused(label, ALERT_CERTIFICATE_EXPIRED, served, client);
        }
    })
    .await;
}

#[tokio::test]
async fn no_client_cert_is_refused() {
    bounded(async {
        let hub = Hub::start().expect("hub");
        let (served, client) = hub
            .attempt(no_cert_config(&hub.paths.ca_cert, tls::ALPN), "localhost")
            .await;
        assert_refused("no client cert", ALERT_CERTIFICATE_REQUIRED, served, client);
    })
    .await;
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    bounded(async {
        let hub = Hub::start().expect("hub");
        let (served, client) = hub
            .attempt(
                no_cert_config(&hub.paths.ca_cert, b"meshbridge/0"),
                "localhost",
            )
            .await;
        assert_refused("wrong ALPN", ALERT_NO_APPLICATION_PROTOCOL, served, client);
    })
    .await;
}

#[tokio::test]
async fn wrong_server_name_is_refused_by_the_client() {
    bounded(async {
        let hub = Hub::start().expect("hub");
        let certs = hub.issue("line1", window(-1, 1)).expect("issue");
        let (served, client) = hub
            .attempt(agent_config(&hub.paths.ca_cert, &certs), "evil.example")
            .await;
        // The client rejects the hub's certificate during its own handshake (bad_certificate, 42) before any
        // stream; the hub sees the client abort.
        assert_refused("wrong server name", ALERT_BAD_CERTIFICATE, served, client);
    })
    .await;
}
