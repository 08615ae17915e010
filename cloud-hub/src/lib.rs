//! cloud-hub: accepts agents over QUIC + mutual TLS, identifies each site by its client certificate, and publishes
//! their messages into the cloud broker under the site's namespace.

pub mod pki;
pub mod tls;
