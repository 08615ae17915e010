//! edge-agent: wraps a site's MQTT broker, queues selected messages durably and streams them to the cloud hub over
//! QUIC + mutual TLS.

pub mod tls;
