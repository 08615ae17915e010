//! Just enough MQTT for the edge agent's front: incremental packet splitting and the few packets it
//! must understand.
//!
//! The embedded broker (rumqttd) acknowledges a client's QoS 1/2 PUBLISH as soon as it holds it in
//! memory. The agent closes that durability window with a *front*: a byte relay on the client port that
//! splits both directions into packets, hands every selected PUBLISH to the commit pipeline and holds the
//! broker's PUBACK/PUBREC until the commit is on disk. That relay only needs:
//!
//! - the fixed header of every packet, to split a byte stream ([`frame_len`], [`split_frame`]);
//! - `CONNECT`, to pick the broker listener by protocol level ([`Connect`]);
//! - `PUBLISH` for 3.1.1 and 5.0 with the v5 properties a bridge must keep ([`Publish`]);
//! - `PUBACK`/`PUBREC`, to match the broker's acks to packet ids ([`Ack`]);
//! - encoders for `PUBLISH`, `PUBACK`/`PUBREC` and a refusing `CONNACK` ([`encode_publish`],
//!   [`encode_ack`], [`encode_connack_refusal`]).
//!
//! Everything else passes through the front as opaque frames, so this is deliberately not a full
//! MQTT codec. Like the rest of `shared` it does no I/O: callers feed bytes in and get values out. The
//! decoder is total: any input gives a value or a [`DecodeError`], never a panic, and
//! [`DecodeError::Incomplete`] (wait for more bytes) is distinct from every malformed-input variant.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use bytes::Bytes;

pub use decode::{
    frame_len, split_frame, suback_codes, subscribe_keeping, ConnectLogin, FixedHeader,
};
pub use encode::{
    encode_ack, encode_connack_refusal, encode_publish, encode_pubrel, encode_suback,
    encode_unsuback, replace_connect_login, set_publish_packet_id,
};

/// Largest value the 4-byte remaining-length varint can carry (MQTT 3.1.1 §2.2.3, 5.0 §1.5.5).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// v5 reason code "Quota exceeded" (0x97), sent by the front instead of the broker's ack when the commit
/// pipeline refused a message, so a v5 publisher learns it was not stored.
pub const REASON_QUOTA_EXCEEDED: u8 = 0x97;

/// CONNACK return code "unacceptable protocol version" (MQTT 3.1/3.1.1); the front refuses MQTT 3.1
/// with it because the embedded broker does not speak 3.1.
pub const CONNACK_UNACCEPTABLE_PROTOCOL: u8 = 0x01;

/// The MQTT control packet types (4 high bits of the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// Client request to connect.
    Connect = 1,
    /// Connect acknowledgment.
    Connack = 2,
    /// Publish message.
    Publish = 3,
    /// QoS 1 publish acknowledgment.
    Puback = 4,
    /// QoS 2 publish received (part 1).
    Pubrec = 5,
    /// QoS 2 publish release (part 2).
    Pubrel = 6,
    /// QoS 2 publish complete (part 3).
    Pubcomp = 7,
    /// Subscribe request.
    Subscribe = 8,
    /// Subscribe acknowledgment.
    Suback = 9,
    /// Unsubscribe request.
    Unsubscribe = 10,
    /// Unsubscribe acknowledgment.
    Unsuback = 11,
    /// Ping request.
    Pingreq = 12,
    /// Ping response.
    Pingresp = 13,
    /// Disconnect notification.
    Disconnect = 14,
    /// Authentication exchange (MQTT 5 only).
    Auth = 15,
}

impl PacketType {
    /// The packet type for the 4-bit code, `None` for the reserved code 0.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Connect,
            2 => Self::Connack,
            3 => Self::Publish,
            4 => Self::Puback,
            5 => Self::Pubrec,
            6 => Self::Pubrel,
            7 => Self::Pubcomp,
            8 => Self::Subscribe,
            9 => Self::Suback,
            10 => Self::Unsubscribe,
            11 => Self::Unsuback,
            12 => Self::Pingreq,
            13 => Self::Pingresp,
            14 => Self::Disconnect,
            15 => Self::Auth,
            _ => return None,
        })
    }
}

/// The MQTT protocol versions, by the protocol level byte of CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (level 3, protocol name `MQIsdp`).
    V3_1,
    /// MQTT 3.1.1 (level 4).
    V3_1_1,
    /// MQTT 5.0 (level 5).
    V5,
}

impl ProtocolVersion {
    /// The version for a CONNECT protocol level byte, `None` for levels no MQTT version uses.
    #[must_use]
    pub const fn from_level(level: u8) -> Option<Self> {
        match level {
            3 => Some(Self::V3_1),
            4 => Some(Self::V3_1_1),
            5 => Some(Self::V5),
            _ => None,
        }
    }

    /// The protocol level byte of this version.
    #[must_use]
    pub const fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }

    /// Whether packets of this version carry properties (only 5.0 does).
    #[must_use]
    pub const fn has_properties(self) -> bool {
        matches!(self, Self::V5)
    }
}

/// Quality of service of a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QoS {
    /// At most once: no packet id, no ack.
    AtMostOnce = 0,
    /// At least once: acknowledged by PUBACK.
    AtLeastOnce = 1,
    /// Exactly once: acknowledged by PUBREC, then PUBREL/PUBCOMP.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for its 2-bit code, `None` for the invalid code 3.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// The fields of a CONNECT the front needs: which broker listener to use and what to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol name: `MQTT` for 3.1.1 and 5.0, `MQIsdp` for 3.1.
    pub protocol_name: String,
    /// Raw protocol level byte; see [`Connect::version`].
    pub protocol_level: u8,
    /// Client identifier (may be empty: the broker then assigns one).
    pub client_id: String,
    /// Keep-alive interval in seconds (0 disables keep-alive).
    pub keep_alive: u16,
    /// Clean session (3.1.1) / clean start (5.0) flag.
    pub clean_start: bool,
    /// The last will, if the client set one.
    pub will: Option<Will>,
    /// v5 Session Expiry Interval in seconds (0 when absent, and for 3.1.1): how long the session
    /// outlives the connection; `u32::MAX` means never expires (MQTT 5.0 §3.1.2.11.2).
    pub session_expiry: u32,
}

/// A CONNECT's last will: the message the broker publishes for the client when its connection ends without
/// a clean DISCONNECT (MQTT 3.1.1 §3.1.2.5, 5.0 §3.1.2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// The will as a PUBLISH: topic, payload, QoS, retain and the v5 will properties that are PUBLISH
    /// properties (no packet id, DUP clear).
    pub publish: Publish,
    /// v5 Will Delay Interval in seconds (0 for 3.1.1 or when absent): the will waits this long, and is
    /// not sent if the client connects again meanwhile.
    pub delay_secs: u32,
}

impl Connect {
    /// The protocol version the client asked for, `None` for an unknown level.
    #[must_use]
    pub const fn version(&self) -> Option<ProtocolVersion> {
        ProtocolVersion::from_level(self.protocol_level)
    }
}

/// The v5 PUBLISH properties that must survive a bridge, plus the topic alias the front resolves.
///
/// All empty for 3.1.1. Order of user properties is kept because MQTT 5 says it is significant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    /// Payload format indicator (0 = bytes, 1 = UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// Message expiry interval in seconds.
    pub message_expiry_interval: Option<u32>,
    /// Topic alias; connection-local, so [`TopicAliases::resolve`] clears it once resolved.
    pub topic_alias: Option<u16>,
    /// Response topic for request/response.
    pub response_topic: Option<String>,
    /// Correlation data for request/response.
    pub correlation_data: Option<Bytes>,
    /// User properties as ordered (name, value) pairs; names may repeat.
    pub user_properties: Vec<(String, String)>,
    /// Subscription identifiers (only valid broker→client; kept so decoding either direction works).
    pub subscription_identifiers: Vec<u32>,
    /// Content type of the payload.
    pub content_type: Option<String>,
}

impl PublishProperties {
    /// Whether no property is set (then a v5 encoder writes a zero property length).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A decoded PUBLISH packet. The payload shares the read buffer (zero-copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag: the sender may have sent this packet before.
    pub dup: bool,
    /// Quality of service.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name; empty when a v5 sender used a topic alias alone (see [`TopicAliases`]).
    pub topic: String,
    /// Packet identifier, present exactly when `qos` is not [`QoS::AtMostOnce`].
    pub packet_id: Option<u16>,
    /// v5 properties; empty for 3.1.1.
    pub properties: PublishProperties,
    /// Application payload.
    pub payload: Bytes,
}

/// Which acknowledgment an [`Ack`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckKind {
    /// PUBACK: acknowledges a QoS 1 PUBLISH.
    Puback,
    /// PUBREC: first acknowledgment of a QoS 2 PUBLISH.
    Pubrec,
}

impl AckKind {
    /// The packet type of this ack.
    #[must_use]
    pub const fn packet_type(self) -> PacketType {
        match self {
            Self::Puback => PacketType::Puback,
            Self::Pubrec => PacketType::Pubrec,
        }
    }
}

/// The topic filters of a SUBSCRIBE or UNSUBSCRIBE packet (options and properties are left for the
/// broker): what the front needs to refuse a malformed filter the broker would grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filters {
    /// Packet identifier.
    pub packet_id: u16,
    /// The filters, in packet order; at least one.
    pub filters: Vec<String>,
    /// For a SUBSCRIBE, each filter's options byte, in the same order (3.1.1: the requested QoS; 5.0
    /// also no-local, retain-as-published and retain handling, see [`SubscriptionOptions`]); empty for
    /// an UNSUBSCRIBE.
    pub options: Vec<u8>,
}

/// The options of one SUBSCRIBE filter (MQTT 5.0 §3.8.3.1; 3.1.1 has the QoS bits only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Highest QoS the subscriber accepts.
    pub qos: QoS,
    /// Do not deliver messages this client published itself.
    pub no_local: bool,
    /// Keep the RETAIN flag of forwarded messages (otherwise it is cleared).
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

impl SubscriptionOptions {
    /// Parses an options byte; `None` if it uses the reserved QoS 3 or retain handling 3, or reserved bits.
    #[must_use]
    pub const fn from_byte(byte: u8) -> Option<Self> {
        let qos = match QoS::from_code(byte & 0b11) {
            Some(qos) => qos,
            None => return None,
        };
        let retain_handling = (byte >> 4) & 0b11;
        if retain_handling == 3 || byte & 0b1100_0000 != 0 {
            return None;
        }
        Some(Self {
            qos,
            no_local: byte & 0b100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        })
    }

    /// The options byte.
    #[must_use]
    pub const fn to_byte(self) -> u8 {
        (self.qos as u8)
            | ((self.no_local as u8) << 2)
            | ((self.retain_as_published as u8) << 3)
            | (self.retain_handling << 4)
    }
}

/// A decoded PUBACK or PUBREC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// PUBACK or PUBREC.
    pub kind: AckKind,
    /// Packet identifier of the acknowledged PUBLISH.
    pub packet_id: u16,
    /// v5 reason code (0 = success when absent on the wire); always 0 for 3.1.1.
    pub reason: u8,
}

/// Why bytes could not be decoded. [`DecodeError::Incomplete`] is the only non-fatal one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends before the packet does: read more bytes and try again.
    #[error("incomplete packet: more bytes needed")]
    Incomplete,
    /// The remaining-length varint has a continuation bit on its 4th byte (MQTT allows at most 4).
    #[error("remaining length is longer than 4 bytes")]
    RemainingLengthTooLong,
    /// The packet (fixed header included) is larger than the configured maximum.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Total packet size declared by the fixed header.
        size: usize,
        /// Configured maximum packet size.
        max: usize,
    },
    /// The first byte has the reserved packet type 0.
    #[error("reserved packet type 0 (first byte {byte:#04x})")]
    ReservedPacketType {
        /// The offending first byte.
        byte: u8,
    },
    /// The flag bits of the first byte are not the ones the packet type requires.
    #[error("invalid flags {flags:#03x} for {packet_type:?}")]
    InvalidFlags {
        /// Packet type from the first byte.
        packet_type: PacketType,
        /// The low 4 bits of the first byte.
        flags: u8,
    },
    /// A parser was called on a packet of another type.
    #[error("expected {expected:?}, found {found:?}")]
    UnexpectedPacket {
        /// Packet type the parser handles.
        expected: PacketType,
        /// Packet type found in the fixed header.
        found: PacketType,
    },
    /// A PUBLISH has QoS bits `11`.
    #[error("invalid QoS 3")]
    InvalidQoS,
    /// The packet ends inside a field although the fixed header said it was complete.
    #[error("packet body ends inside {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A string field is not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        field: &'static str,
    },
    /// A string field contains a character MQTT forbids there (U+0000, or a wildcard in a topic name).
    #[error("{field} contains a forbidden character")]
    ForbiddenCharacter {
        /// The field being read.
        field: &'static str,
    },
    /// A 3.1 / 3.1.1 PUBLISH with an empty topic name: topic names are at least one character long
    /// (MQTT 3.1.1 §4.7.3); only MQTT 5 sends an empty one, with a topic alias (checked by
    /// [`TopicAliases::resolve`]).
    #[error("empty topic name")]
    EmptyTopicName,
    /// A QoS 1/2 PUBLISH or an ack carries packet identifier 0.
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A v5 property identifier that is unknown or not allowed in this packet.
    #[error("property {id:#04x} is not allowed here")]
    InvalidProperty {
        /// The property identifier.
        id: u8,
    },
    /// A v5 property that may appear once appears twice.
    #[error("property {id:#04x} appears more than once")]
    DuplicateProperty {
        /// The property identifier.
        id: u8,
    },
    /// A v5 property has a value outside its range (topic alias 0, format indicator > 1, ...).
    #[error("property {id:#04x} has an invalid value")]
    InvalidPropertyValue {
        /// The property identifier.
        id: u8,
    },
    /// A v5 variable-byte integer inside the body is longer than 4 bytes.
    #[error("variable-byte integer in {field} is longer than 4 bytes")]
    VarIntTooLong {
        /// The field being read.
        field: &'static str,
    },
    /// The CONNECT protocol name is neither `MQTT` nor `MQIsdp`.
    #[error("unknown protocol name {name:?}")]
    UnknownProtocolName {
        /// The name found.
        name: String,
    },
    /// Bytes are left after the last field of a packet whose layout is fully known.
    #[error("{extra} unexpected bytes after the last field")]
    TrailingBytes {
        /// How many bytes were left.
        extra: usize,
    },
}

impl DecodeError {
    /// Whether this error only means "read more bytes".
    #[must_use]
    pub const fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete)
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field is longer than the 65,535 bytes its 2-byte length prefix allows.
    #[error("{field} is {len} bytes, more than 65535")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The remaining length would exceed [`MAX_REMAINING_LENGTH`].
    #[error("remaining length {len} exceeds the MQTT maximum")]
    PacketTooLarge {
        /// The remaining length the packet would have.
        len: usize,
    },
    /// QoS 1/2 needs a non-zero packet identifier and QoS 0 must not have one.
    #[error("packet identifier {packet_id:?} does not fit QoS {qos:?}")]
    PacketIdMismatch {
        /// The QoS of the packet.
        qos: QoS,
        /// The packet identifier given.
        packet_id: Option<u16>,
    },
    /// A subscription identifier of 0 or above 268,435,455.
    #[error("subscription identifier {value} out of range")]
    SubscriptionIdentifierOutOfRange {
        /// The value given.
        value: u32,
    },
    /// The packet to re-encode was not well formed.
    #[error("malformed input packet: {0}")]
    Malformed(#[source] DecodeError),
}

/// Why [`TopicAliases::resolve`] failed. Each is a protocol error by the client (MQTT 5 §3.3.2.3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    /// A PUBLISH with an empty topic and no topic alias.
    #[error("empty topic without a topic alias")]
    EmptyTopic,
    /// An empty topic with an alias this connection never defined.
    #[error("topic alias {alias} was never defined on this connection")]
    UnknownAlias {
        /// The alias used.
        alias: u16,
    },
    /// Topic alias 0 (not allowed).
    #[error("topic alias 0")]
    ZeroAlias,
}

/// The client→server topic aliases of one MQTT 5 connection.
///
/// A v5 client may send a topic once with an alias and later send only the alias with an empty topic.
/// The bridge must carry real topics, so the front keeps this map per connection and resolves every
/// captured PUBLISH. Bounded by construction: at most 65,535 entries.
#[derive(Debug, Clone, Default)]
pub struct TopicAliases {
    map: HashMap<u16, String>,
}

impl TopicAliases {
    /// An empty alias map, as at the start of a connection.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records or applies the topic alias of `publish`: afterwards its topic is the real topic and its
    /// `topic_alias` property is cleared (aliases mean nothing beyond this connection).
    ///
    /// # Errors
    /// [`AliasError`] when the packet is a protocol error: empty topic without alias, unknown alias or
    /// alias 0. The map is unchanged then.
    pub fn resolve(&mut self, publish: &mut Publish) -> Result<(), AliasError> {
        match publish.properties.topic_alias {
            None if publish.topic.is_empty() => Err(AliasError::EmptyTopic),
            None => Ok(()),
            Some(0) => Err(AliasError::ZeroAlias),
            Some(alias) if publish.topic.is_empty() => {
                let topic = self
                    .map
                    .get(&alias)
                    .ok_or(AliasError::UnknownAlias { alias })?;
                publish.topic.clone_from(topic);
                publish.properties.topic_alias = None;
                Ok(())
            }
            Some(alias) => {
                self.map.insert(alias, publish.topic.clone());
                publish.properties.topic_alias = None;
                Ok(())
            }
        }
    }
}
