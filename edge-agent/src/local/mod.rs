//! The local (site) broker side: where messages enter the agent.
//!
//! - [`embedded`]: rumqttd in-process behind the ack-holding front (`meshbridge_broker`), which commits
//!   selected PUBLISHes before their publishers get a PUBACK.
//! - [`external`]: an existing broker (e.g. Mosquitto) joined as a persistent-session rumqttc client with
//!   manual acks, acknowledging each message only after it is committed.
//!
//! Both run until the shutdown token is cancelled and return only after every message they took has been
//! committed (or refused), so the uplink can drain afterwards.

pub(crate) mod deliver;
pub(crate) mod embedded;
pub(crate) mod external;
