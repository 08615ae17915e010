//! The agent↔hub protocol, spoken over one bidirectional QUIC stream.
//!
//! # Framing
//! Every frame is `u32 BE length` + `u8 frame type` + body, where `length` counts the type byte and the
//! body (not the prefix itself). The receiver's maximum frame size bounds `length`, and is checked as soon as
//! the prefix arrives. All integers are big-endian.
//!
//! | type | frame         | body |
//! |------|---------------|------|
//! | 0x01 | `Hello`       | `u16 min` `u16 max` `u64 capabilities` `u64 incarnation` `u64 last_acked` `u64 config_version` `str16 agent_name` [`u8 lane`, absent = 0] [`str16 agent_version`, absent = empty] [`u32 window`, absent = 0] (then bytes a later version may add, ignored) |
//! | 0x02 | `Welcome`     | `u16 version` `u64 capabilities` `u32 max_frame_size` `u64 hub_high_water` `u64 config_version` `u32 max_message_size` `u16 max_topic_len` (the last two since version 2) `str16 hub_version` (since version 3) |
//! | 0x03 | `Batch`       | `u32 count`, then `count` × (`u64 seq` `u32 body_len` body) |
//! | 0x04 | `Ack`         | `u64 upto` |
//! | 0x05 | `ConfigPush`  | `u64 version` `str32 toml` |
//! | 0x06 | `ConfigAck`   | `u64 version` `u8 status` (0 = applied; 1 = rejected, then `u16 reason` `str32 detail`) |
//! | 0x07 | `Downlink`    | as `Batch` |
//! | 0x08 | `DownlinkAck` | `u64 upto` |
//! | 0x09 | `Ping`        | `u64 nonce` |
//! | 0x0A | `Pong`        | `u64 nonce` |
//! | 0x0B | `GoAway`      | `u16 code` `str16 reason` (then `u32 retry_after_ms` only to an agent that announced [`Capabilities::RETRY_AFTER`]) |
//! | 0x0C | `Refused`     | `u64 seq` `u8 reason_code` `str16 detail` |
//!
//! `str16`/`str32` are UTF-8 with a `u16`/`u32` byte-length prefix. An entry body is exactly what
//! [`Envelope::encode_body`] writes, which is also what the durable queue stores, so the agent copies queue
//! records into a frame with [`BatchEncoder`] without decoding them.
//!
//! # Where the origin lives
//! The origin site name is inside every entry body, in `Batch` as in `Downlink`, rather than once in the
//! `Batch` header. Three reasons: the queue record must be self-contained (`decode_body(seq, body)` yields a
//! whole [`Envelope`]); a header origin would force the agent to strip it from stored bytes, defeating the
//! straight copy; and the hub may not trust it anyway: the site identity comes from the TLS client
//! certificate, so the hub checks (or overwrites) `origin` on every uplink entry against that identity. The
//! cost is `2 + len(origin)` bytes per entry.
//!
//! # Evolution
//! `Hello` and `GoAway` are read before (or instead of) an agreed version, so their layouts are frozen;
//! `Hello` may only grow at the end. Everything else may change with [`PROTOCOL_VERSION`]. Envelope bodies
//! carry their own format version byte because they outlive a connection in the queue file.
//!
//! | version | change |
//! |---------|--------|
//! | 1 | first version |
//! | 2 | `Welcome` ends with `u32 max_message_size` `u16 max_topic_len`: the hub states the largest payload and the longest site-local topic it will publish, so the agent refuses at PUBLISH time what the hub would drop after the publisher was acknowledged ([`crate::limits`]). Version 1 is no longer spoken: a v1 hub cannot state its limits, so an agent talking to it could again acknowledge what the hub then drops. Also new in 2: `Refused` (hub → agent), a message refused for good, which the agent dead-letters before the `Ack` that covers it. |
//! | 3 | `Welcome` ends with `str16 hub_version`, the hub's software version, which the agent logs and exports (`meshbridge_uplink_protocol_version`, the "uplink connected" line), so an operator sees which hubs a fleet mid-upgrade talks to. Versions 2 and 3 are spoken ([`SUPPORTED`]): an agent and a hub one version apart agree on 2. |
//!
//! `GoAway` grew once, without a version bump, and only in a way no older peer can see:
//! - the code [`GoAwayCode::Unavailable`] (7): the hub cannot take data now (its cloud broker is not
//!   connected) and says so *before* `Welcome`. An older agent decodes it as `Unknown(7)`, a refusal like any
//!   other, and retries with its own backoff;
//! - an optional `u32 retry_after_ms` after the reason: how long the agent should wait before its next
//!   attempt. Decoders before it reject bytes after the reason ([`DecodeError::TrailingBytes`]), so the hub
//!   appends it only when the agent's `Hello` carried [`Capabilities::RETRY_AFTER`]; `Hello` is read before
//!   any `GoAway` the hub sends, so the hub always knows. An older hub ignores the unknown capability bit (it
//!   answers with the intersection) and never sends the trailer. This decoder reads the trailer when any byte
//!   follows the reason, and still refuses anything after it.
//!
//! # Decoding
//! In the shape of mini-redis's `Frame::check`/`Frame::parse`: [`check`] says whether a whole frame is
//! buffered (or [`DecodeError::Incomplete`]), [`parse`] turns its bytes into a [`Frame`], and [`decode`]
//! does both on a read buffer. The decoder is total and allocates at most a small constant factor of the
//! frame it was given: counts read from the wire never size an allocation beyond what the remaining bytes
//! could hold.

pub(crate) mod buf;
mod codec;
mod error;
mod version;

#[cfg(test)]
pub(crate) mod arb;

use std::fmt;

pub use codec::{
    check, decode, encode_batch_raw, parse, BatchEncoder, BatchKind, DEFAULT_MAX_FRAME_SIZE,
};
pub use error::{DecodeError, EncodeError, VersionMismatch};
pub use version::{negotiate, VersionRange, OLDEST_SUPPORTED, PROTOCOL_VERSION, SUPPORTED};

use crate::envelope::Envelope;

/// One message of the agent↔hub protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Agent → hub, first frame on a connection.
    Hello {
        /// Protocol versions the agent speaks.
        versions: VersionRange,
        /// Optional features the agent supports.
        capabilities: Capabilities,
        /// The agent's configured name. Informational only (logs): the hub identifies the site by the TLS
        /// client certificate.
        agent_name: String,
        /// Random id of the agent's queue file. A new value tells the hub that seqs restart at 1 and its
        /// high-water mark for the old incarnation no longer applies.
        incarnation: u64,
        /// Highest seq the agent has seen acknowledged (0 if none).
        last_acked: u64,
        /// Version of the config the agent runs, so the hub knows whether to push.
        config_version: u64,
        /// The priority lane this connection carries (0 = the default lane; see `crate::link::lane`).
        /// Added at the end of the frozen layout: a `Hello` without it is lane 0, and an older hub ignores it.
        lane: u8,
        /// The agent's software version (for the hub's status topic); empty when an older agent sent
        /// none. After `lane` in the frozen layout.
        agent_version: String,
        /// Batches the agent keeps in flight (its uplink window); 0 when an older agent did not say.
        /// The hub may hold its `Ack`s back briefly while fewer than half of them wait (one `Ack` then
        /// covers several batches); an agent that states nothing is acknowledged batch by batch. After
        /// `agent_version` in the frozen layout.
        window: u32,
    },
    /// Hub → agent, accepts a `Hello`.
    Welcome {
        /// The version chosen by [`negotiate`]; both sides speak it from now on.
        version: u16,
        /// Features both sides support (intersection of both sets).
        capabilities: Capabilities,
        /// Largest frame (type byte plus body) the hub accepts; the agent sizes batches by it.
        max_frame_size: u32,
        /// Highest contiguous seq the hub has committed for this site and incarnation. The agent resumes
        /// sending after it and may drop everything up to it.
        hub_high_water: u64,
        /// Config version the hub wants the agent to run.
        config_version: u64,
        /// Largest payload (bytes) the hub publishes for this site (its `limits.max_message_size`). The agent
        /// refuses larger messages at PUBLISH time instead of acknowledging them.
        max_message_size: u32,
        /// Longest site-local topic (bytes) the hub can publish: 65,535 minus the length of this site's
        /// namespace prefix and its `/`. The agent refuses longer topics at PUBLISH time.
        max_topic_len: u16,
        /// The hub's software version (`cloud-hub --version`); empty at version 2, whose `Welcome` ends
        /// before it.
        hub_version: String,
    },
    /// Agent → hub uplink data, in seq order.
    Batch {
        /// The messages; each carries its own origin (see the module docs).
        entries: Vec<Envelope>,
    },
    /// Hub → agent: every uplink seq up to and including `upto` is committed at the hub (cumulative).
    Ack {
        /// Highest acknowledged seq.
        upto: u64,
    },
    /// Hub → agent: a new config to validate and apply.
    ConfigPush {
        /// Version of this config; acks name it.
        version: u64,
        /// The config as TOML text.
        body: String,
    },
    /// Agent → hub: outcome of a `ConfigPush`.
    ConfigAck {
        /// The version pushed.
        version: u64,
        /// `Ok` if the agent now runs it, else why not.
        result: Result<(), ConfigRejection>,
    },
    /// Hub → agent data (from the cloud or other sites), in the hub's per-site downlink seq order.
    Downlink {
        /// The messages; origin per entry since they may come from any site.
        entries: Vec<Envelope>,
    },
    /// Agent → hub: every downlink seq up to and including `upto` has been handed to the local broker.
    DownlinkAck {
        /// Highest acknowledged downlink seq.
        upto: u64,
    },
    /// Liveness probe; the peer answers with a `Pong` carrying the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to a `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Hub → agent: the uplink entry `seq` was refused for good (the cloud broker answered with a failure
    /// reason code, or the message cannot be published at all) and will be covered by the next `Ack`. The
    /// agent moves it to its dead-letter store before it applies that `Ack`, so a refusal of one message
    /// never wedges the ones behind it and never loses it silently.
    Refused {
        /// The refused entry.
        seq: u64,
        /// An MQTT 5 reason code saying why (0x87 not authorized, 0x90 topic name invalid, 0x95 packet too
        /// large, ...), as the cloud broker gave it or the hub chose.
        reason_code: u8,
        /// Human-readable detail for the log and the dead-letter listing.
        detail: String,
    },
    /// The sender is closing the connection and says why. Last frame on a stream.
    GoAway {
        /// Machine-readable reason.
        code: GoAwayCode,
        /// Human-readable detail for the log (e.g. the [`VersionMismatch`] text).
        reason: String,
        /// Hub → agent: wait at least this long (milliseconds) before reconnecting. Only ever `Some` towards
        /// an agent that announced [`Capabilities::RETRY_AFTER`] (see "Evolution" in the module docs).
        retry_after_ms: Option<u32>,
    },
}

impl Frame {
    /// The frame's type, for logs and metrics.
    pub const fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello { .. } => FrameType::Hello,
            Self::Welcome { .. } => FrameType::Welcome,
            Self::Batch { .. } => FrameType::Batch,
            Self::Ack { .. } => FrameType::Ack,
            Self::ConfigPush { .. } => FrameType::ConfigPush,
            Self::ConfigAck { .. } => FrameType::ConfigAck,
            Self::Downlink { .. } => FrameType::Downlink,
            Self::DownlinkAck { .. } => FrameType::DownlinkAck,
            Self::Ping { .. } => FrameType::Ping,
            Self::Pong { .. } => FrameType::Pong,
            Self::GoAway { .. } => FrameType::GoAway,
            Self::Refused { .. } => FrameType::Refused,
        }
    }
}

/// The frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// See [`Frame::Hello`].
    Hello = 0x01,
    /// See [`Frame::Welcome`].
    Welcome = 0x02,
    /// See [`Frame::Batch`].
    Batch = 0x03,
    /// See [`Frame::Ack`].
    Ack = 0x04,
    /// See [`Frame::ConfigPush`].
    ConfigPush = 0x05,
    /// See [`Frame::ConfigAck`].
    ConfigAck = 0x06,
    /// See [`Frame::Downlink`].
    Downlink = 0x07,
    /// See [`Frame::DownlinkAck`].
    DownlinkAck = 0x08,
    /// See [`Frame::Ping`].
    Ping = 0x09,
    /// See [`Frame::Pong`].
    Pong = 0x0A,
    /// See [`Frame::GoAway`].
    GoAway = 0x0B,
    /// See [`Frame::Refused`].
    Refused = 0x0C,
}

impl FrameType {
    /// Every frame type, in wire order.
    pub const ALL: [Self; 12] = [
        Self::Hello,
        Self::Welcome,
        Self::Batch,
        Self::Ack,
        Self::ConfigPush,
        Self::ConfigAck,
        Self::Downlink,
        Self::DownlinkAck,
        Self::Ping,
        Self::Pong,
        Self::GoAway,
        Self::Refused,
    ];

    /// The name used in logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hello => "Hello",
            Self::Welcome => "Welcome",
            Self::Batch => "Batch",
            Self::Ack => "Ack",
            Self::ConfigPush => "ConfigPush",
            Self::ConfigAck => "ConfigAck",
            Self::Downlink => "Downlink",
            Self::DownlinkAck => "DownlinkAck",
            Self::Ping => "Ping",
            Self::Pong => "Pong",
            Self::GoAway => "GoAway",
            Self::Refused => "Refused",
        }
    }
}

impl TryFrom<u8> for FrameType {
    type Error = DecodeError;

    fn try_from(byte: u8) -> Result<Self, DecodeError> {
        Self::ALL
            .into_iter()
            .find(|t| *t as u8 == byte)
            .ok_or(DecodeError::UnknownFrameType(byte))
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Optional protocol features, as a `u64` bit set. Unknown bits are kept (not rejected) so a newer peer can
/// announce features this build ignores; the hub answers with the intersection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(u64);

impl Capabilities {
    /// No optional feature.
    pub const EMPTY: Self = Self(0);
    /// The agent accepts `Downlink` frames (it can publish hub-originated messages into its broker).
    pub const DOWNLINK: Self = Self(1 << 0);
    /// The agent accepts `ConfigPush` and answers with `ConfigAck`.
    pub const CONFIG_PUSH: Self = Self(1 << 1);
    /// The agent reads the optional `retry_after_ms` at the end of `GoAway` (see "Evolution" in the module
    /// docs); the hub sends that field to no other agent.
    pub const RETRY_AFTER: Self = Self(1 << 2);

    /// Wraps raw bits, keeping unknown ones.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every feature in `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Features in both sets: what a connection may use.
    #[must_use]
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// Features in either set.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl std::ops::BitAnd for Capabilities {
    type Output = Self;

    fn bitand(self, rhs: Self) -> Self {
        self.intersection(rhs)
    }
}

/// Why a connection is being closed, sent in `GoAway`.
///
/// Codes this build does not know decode as [`Unknown`](Self::Unknown) so an older peer still logs them.
/// `Unknown` holding a known code is never produced by decoding; encoding it writes that code, which then
/// decodes as the named variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoAwayCode {
    /// Orderly close with nothing wrong (e.g. the agent is stopping).
    Normal,
    /// No common protocol version; the reason holds the [`VersionMismatch`] text.
    IncompatibleVersion,
    /// The certificate is valid but names no site the hub serves.
    Unauthorized,
    /// Another connection for the same site took over; this one must not reconnect in a loop against it.
    Replaced,
    /// The peer sent something the protocol forbids (a decode error or an out-of-order frame).
    ProtocolError,
    /// The hub sheds load; retry later with backoff.
    Overloaded,
    /// The sender is shutting down; reconnect (to another instance) later.
    ShuttingDown,
    /// The hub cannot accept data right now (its cloud broker is not connected), refused before `Welcome`;
    /// retry after the `GoAway`'s `retry_after_ms` if it carries one, else with backoff.
    Unavailable,
    /// A code this build does not know.
    Unknown(u16),
}

impl GoAwayCode {
    /// The wire value.
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 0,
            Self::IncompatibleVersion => 1,
            Self::Unauthorized => 2,
            Self::Replaced => 3,
            Self::ProtocolError => 4,
            Self::Overloaded => 5,
            Self::ShuttingDown => 6,
            Self::Unavailable => 7,
            Self::Unknown(code) => code,
        }
    }

    /// The variant for a wire value; never fails, unknown values become [`Unknown`](Self::Unknown).
    pub const fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Normal,
            1 => Self::IncompatibleVersion,
            2 => Self::Unauthorized,
            3 => Self::Replaced,
            4 => Self::ProtocolError,
            5 => Self::Overloaded,
            6 => Self::ShuttingDown,
            7 => Self::Unavailable,
            other => Self::Unknown(other),
        }
    }
}

impl From<u16> for GoAwayCode {
    fn from(code: u16) -> Self {
        Self::from_code(code)
    }
}

impl From<GoAwayCode> for u16 {
    fn from(code: GoAwayCode) -> Self {
        code.code()
    }
}

/// Why an agent refused a pushed config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config rejected ({reason}): {detail}")]
pub struct ConfigRejection {
    /// Machine-readable class of failure.
    pub reason: ConfigRejectReason,
    /// Human-readable detail, e.g. every validation error, one per line.
    pub detail: String,
}

/// Class of a [`ConfigRejection`]; unknown wire values are kept as [`Unknown`](Self::Unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigRejectReason {
    /// The TOML did not parse or did not pass `validate()`; pushing it again will not help.
    Invalid,
    /// The version is older than the one the agent runs (a delayed or duplicated push).
    Stale,
    /// The config is valid but applying it failed (e.g. a port in use); the agent kept its last-good config.
    ApplyFailed,
    /// A reason this build does not know.
    Unknown(u16),
}

impl ConfigRejectReason {
    /// The wire value.
    pub const fn code(self) -> u16 {
        match self {
            Self::Invalid => 1,
            Self::Stale => 2,
            Self::ApplyFailed => 3,
            Self::Unknown(code) => code,
        }
    }

    /// The variant for a wire value; never fails.
    pub const fn from_code(code: u16) -> Self {
        match code {
            1 => Self::Invalid,
            2 => Self::Stale,
            3 => Self::ApplyFailed,
            other => Self::Unknown(other),
        }
    }
}

impl fmt::Display for ConfigRejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid => f.write_str("invalid"),
            Self::Stale => f.write_str("stale version"),
            Self::ApplyFailed => f.write_str("apply failed"),
            Self::Unknown(code) => write!(f, "unknown reason {code}"),
        }
    }
}
