//! The agent's side of mutual TLS over QUIC: trust only our private CA for the hub, and present the site's client
//! certificate, which is the *only* thing the hub believes about who we are.
//!
//! Configs are built with the ring provider passed explicitly (`builder_with_provider`), so no process-wide
//! default crypto provider is needed.
//!
//! The site certificate is re-read when its files change (checked at most every 2 s, at a handshake), so a
//! certificate renewed with `cloud-hub pki renew-site` is presented from the next connection on, without a
//! restart; a pair that does not load is reported and the running one stays.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_tls::load_roots;
pub use meshbridge_tls::{provider, PemError, ALPN};
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

/// Errors building the agent's TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the configuration: protocol versions, or the certificate does not match the key.
    #[error("invalid TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// The rustls configuration has no cipher suite usable for QUIC's initial packets.
    #[error("TLS configuration unusable for QUIC")]
    NoInitialCipherSuite(#[from] NoInitialCipherSuite),
    /// The site certificate and key cannot be used together.
    #[error(transparent)]
    Certificate(#[from] meshbridge_tls::TlsError),
    /// The idle timeout does not fit in a QUIC varint of milliseconds.
    #[error("idle timeout {idle_timeout:?} is too large for QUIC")]
    IdleTimeoutTooLarge {
        /// The rejected value.
        idle_timeout: Duration,
    },
}

/// QUIC transport knobs for the agent's connection to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTransport {
    /// Declare the hub gone after this long without any packet from it.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without traffic, so NAT bindings and the idle timer stay alive while
    /// the site has nothing to send. Must be well below `idle_timeout` (and below the hub's).
    pub keep_alive_interval: Option<Duration>,
    /// Per-stream flow-control window in bytes for data from the hub (acks, config pushes: small).
    pub stream_receive_window: u32,
    /// Connection-wide flow-control window in bytes.
    pub receive_window: u32,
    /// Bytes the agent may have in flight towards the hub. Uplink throughput is bounded by `window / RTT`, so a
    /// backlog drain after an outage needs several MiB here.
    pub send_window: u64,
    /// RTT assumed before the first measurement. It sets how soon an unanswered handshake packet is resent
    /// (about 3× this, doubling each time): with quinn's default (333 ms) a hub that comes back just after
    /// an attempt started is noticed only ~1 s later. A lower guess costs at most a few spurious resends of
    /// the first packet on a long-RTT link; the estimate is replaced by the first real sample.
    pub initial_rtt: Duration,
    /// Largest ACK delay the agent asks the hub to use (QUIC ACK-frequency extension). It is part of every
    /// probe timeout, and under loss the probe timeout doubles with each unanswered probe: with QUIC's
    /// default 25 ms, 30 % loss stalled the link for over 3 s at times (issue 7, hole 12; measured in
    /// `tests/tests/fault_suite.rs`). Peers clamp it to at most the RTT (or 25 ms), so on a long link
    /// this changes nothing; the cost is an ACK for nearly every packet from the hub.
    pub max_ack_delay: Duration,
    /// How many ack-eliciting packets the hub may receive before it must acknowledge at once (QUIC
    /// ACK-frequency extension; QUIC's default is 1, an ACK for every second packet). At a factory line's
    /// rate each packet carries one message, and every ACK wakes both programs; a higher threshold lets
    /// `max_ack_delay` gather them. A gap in packet numbers is still acknowledged at once (quinn's
    /// reordering threshold is left at its default), so loss recovery does not wait for it.
    pub ack_eliciting_threshold: u32,
}

impl Default for ClientTransport {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_secs(5)),
            stream_receive_window: 1 << 20,
            receive_window: 4 << 20,
            send_window: 16 << 20,
            initial_rtt: Duration::from_millis(100),
            max_ack_delay: Duration::from_millis(5),
            ack_eliciting_threshold: 8,
        }
    }
}

impl ClientTransport {
    fn to_quinn(&self) -> Result<TransportConfig, TlsError> {
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            TlsError::IdleTimeoutTooLarge {
                idle_timeout: self.idle_timeout,
            }
        })?;
        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive_interval)
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window)
            .initial_rtt(self.initial_rtt);
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.max_ack_delay(Some(self.max_ack_delay))
            .ack_eliciting_threshold(VarInt::from_u32(self.ack_eliciting_threshold));
        t.ack_frequency_config(Some(ack));
        Ok(t)
    }
}

/// Builds the agent's QUIC client configuration: TLS 1.3 only, the hub verified against the CA in `ca` (and the
/// server name given to `connect`), the site certificate/key from `cert`/`key` (PEM) presented for client auth
/// and re-read when they change (each reload or refused pair goes to `hook`), ALPN [`ALPN`].
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    transport: &ClientTransport,
    hook: meshbridge_tls::server::ReloadHook,
) -> Result<quinn::ClientConfig, TlsError> {
    let roots = load_roots(ca)?;
    let resolver = meshbridge_tls::server::ReloadingCert::new(cert, key, hook)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.to_quinn()?));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loaders themselves are tested in `meshbridge-tls`; this checks their errors reach the caller
    /// naming the file.
    #[test]
    fn a_missing_ca_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let hook: meshbridge_tls::server::ReloadHook = Arc::new(|_| {});
        let err = client_config(
            &missing,
            &missing,
            &missing,
            &ClientTransport::default(),
            hook,
        )
        .expect_err("must fail");
        assert!(
            matches!(&err, TlsError::Pem(e @ PemError::Io { .. }) if e.path() == missing),
            "{err:?}"
        );
    }
}
