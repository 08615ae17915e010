//! Errors at the wire boundary: decoding untrusted bytes, encoding values whose fields overflow their length
//! prefixes, and failing to agree on a protocol version.

use super::{FrameType, VersionRange};
use crate::envelope::BODY_VERSION;

/// Why bytes could not be turned into a [`Frame`](super::Frame) or an [`Envelope`](crate::envelope::Envelope).
///
/// The decoder is total: every input gives a value or one of these, never a panic. Apart from
/// [`Incomplete`](Self::Incomplete), every variant means the peer (or the queue file) sent bytes this build
/// cannot accept, so a connection should be closed with [`GoAwayCode::ProtocolError`](super::GoAwayCode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer holds only part of a frame. This is the expected condition while reading a stream (read
    /// more bytes and try again), not a fault; [`decode`](super::decode) turns it into `Ok(None)`.
    #[error("incomplete frame: more bytes are needed")]
    Incomplete,
    /// The length prefix announces a frame larger than the receiver accepts. Reported as soon as the 4-byte
    /// prefix is seen, before any of the frame is buffered, so a hostile length cannot make us allocate.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Length announced by the prefix (frame type byte plus body).
        len: usize,
        /// The receiver's maximum.
        max: usize,
    },
    /// The frame type byte names no frame this build knows.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A field runs past the end of its frame or envelope body.
    #[error("truncated {what}: needed {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// A string field is not valid UTF-8 (MQTT topics and properties must be).
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field that failed validation.
        field: &'static str,
    },
    /// The QoS bits of an envelope hold 3, which MQTT does not define.
    #[error("invalid QoS {0}, expected 0, 1 or 2")]
    InvalidQos(u8),
    /// A frame with a fixed layout is followed by bytes it does not define. Only `Hello` tolerates trailing
    /// bytes (it is read before a version is agreed, so later versions may extend it).
    #[error("{extra} unexpected bytes after a {frame} frame")]
    TrailingBytes {
        /// The frame that was fully read.
        frame: FrameType,
        /// How many bytes were left over.
        extra: usize,
    },
    /// The envelope body starts with a format version this build cannot read (a newer agent wrote it, or the
    /// queue file is corrupt).
    #[error("unsupported envelope body version {0}, this build reads version {BODY_VERSION}")]
    UnsupportedBodyVersion(u8),
    /// The envelope flags set reserved bits, or set `tracestate` without a trace context.
    #[error("invalid envelope flags {flags:#06x}")]
    InvalidFlags {
        /// The flags as read.
        flags: u16,
    },
    /// A one-byte discriminant (such as the `ConfigAck` status) holds a value with no meaning.
    #[error("invalid {what} tag {value}")]
    InvalidTag {
        /// The field holding the tag.
        what: &'static str,
        /// The value read.
        value: u8,
    },
}

/// Why a value could not be encoded. Encoders check before they write a field and, on error, leave the
/// buffer exactly as they found it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field is longer than its length prefix can express (e.g. a topic over 65,535 bytes, which MQTT
    /// itself cannot carry, so this means the value was built by hand).
    #[error("{field} is {len} bytes long, the wire format allows at most {max}")]
    FieldTooLong {
        /// The field that overflowed.
        field: &'static str,
        /// Its length in bytes (or its element count, for lists).
        len: usize,
        /// The largest length the format allows.
        max: usize,
    },
    /// The frame would be longer than allowed: over `u32::MAX`, or, for a
    /// [`BatchEncoder`](super::BatchEncoder), over the peer's maximum frame size. For a batch this is the
    /// signal to finish the frame and start another; if the batch was empty, the entry can never be sent.
    #[error("frame of {len} bytes would exceed the maximum of {max} bytes")]
    FrameTooLarge {
        /// Length the frame (type byte plus body) would have had.
        len: usize,
        /// The limit it hit.
        max: usize,
    },
}

/// The agent and the hub share no protocol version. Displays both ranges so either side can print it as is
/// (the hub also sends it as the `GoAway` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: agent speaks {agent}, hub speaks {hub}")]
pub struct VersionMismatch {
    /// Versions the agent offered.
    pub agent: VersionRange,
    /// Versions the hub supports.
    pub hub: VersionRange,
}
