//! # meshbridge shared core
//!
//! Everything the edge agent and the cloud hub must agree on, written as pure logic: no sockets and no
//! clock reads (time is always a parameter), in the way quinn-proto sits under quinn. The async programs are
//! thin shells that feed bytes and timestamps in and act on what comes out.
//!
//! # Layout
//! - [`envelope`]: the unit of data that crosses the mesh, with everything an MQTT message must keep.
//! - [`wire`]: the length-framed, versioned agent↔hub protocol and its total decoder.
//! - [`topic`]: MQTT topic names and filters, wildcard matching and namespace mapping.
//! - [`trace`]: W3C `traceparent` parsing and the OpenTelemetry sampling rules (the exporter is in
//!   `metrics/src/otel.rs`).
//! - [`policy`]: pure policies: the per-origin dedup window, the routing engine (routes, loop prevention,
//!   per-route dedup).
//! - [`hash`]: a stable 64-bit hash for config versions and persisted dedup keys.
//! - [`auth`]: password files (Mosquitto's format) and topic ACLs (Mosquitto's `acl_file`), pure.
//! - [`config`]: the serde config model of both programs, loading and `validate()`.
//! - [`limits`]: the message size and topic length a message must meet to cross the whole path, announced
//!   by the hub and checked by the agent at PUBLISH time.
//! - [`link`]: the agent↔hub link protocol as two pure state machines (handshake, window, acks, resume,
//!   config push, downlink) that the async shells drive.
//! - [`bundle`]: the site bundle `cloud-hub site add` writes and `edge-agent bootstrap` installs.
//! - [`site`]: the rules of a site name, shared by the config model, the PKI and the hub.
//! - [`queue`]: the durable outbound queue (redb) and its in-memory model. The one module that touches the
//!   disk, because the guarantee it gives (committed before acknowledged) is the product's core promise.
#![warn(missing_docs)]

pub mod auth;
pub mod bundle;
pub mod config;
pub mod envelope;
pub mod hash;
pub mod limits;
pub mod link;
pub mod mqtt;
pub mod policy;
pub mod queue;
pub mod site;
pub mod status;
pub mod topic;
pub mod trace;
pub mod wire;
