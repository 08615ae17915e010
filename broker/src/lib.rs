//! meshbridge-broker: the MQTT broker pieces both programs run.
//!
//! The agent wraps a site broker and the hub wraps the cloud broker, and by default both embed rumqttd
//! behind the same front. They live in a crate of their own (rather than in `edge-agent`, where they
//! started) so the hub can use them without depending on the agent.
//!
//! - [`embedded`]: rumqttd running in-process on internal loopback listeners (one v3.1.1, one v5).
//! - [`listeners`]: a broker section's client ports (plain or TLS) with their auth rules.
//! - [`front`]: the MQTT-aware relay on the client port. It dispatches each client to the internal listener
//!   of its protocol version (so one port serves 3.1.1 and 5.0 clients), and for the messages the uplink
//!   routes select it holds the publisher's ack until the message is committed to the durable queue,
//!   closing the window in which rumqttd has acked a message that is only in memory.

pub mod auth;
pub mod embedded;
pub mod front;
pub mod listeners;
pub mod sessions;
