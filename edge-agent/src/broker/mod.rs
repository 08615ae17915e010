//! The agent's local MQTT broker side.
//!
//! - [`embedded`]: rumqttd running in-process on internal loopback listeners.
//! - [`front`]: the MQTT-aware relay on the client port that holds a publisher's ack until the message
//!   is committed to the durable queue, closing the window in which rumqttd has acked a message that
//!   is only in memory.

pub mod embedded;
pub mod front;
