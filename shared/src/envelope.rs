//! The envelope: the unit of data that crosses the mesh, with everything an MQTT 5 message must keep through
//! a bridge (QoS, retain, the properties a consumer can see, and the W3C trace context).
//!
//! # Body format
//! The durable queue assigns `seq` and stores the rest as opaque bytes, so the binary form is split:
//! [`Envelope::encode_body`] writes everything except `seq`, and [`Envelope::decode_body`] takes the seq
//! back as a parameter. The same bytes go into `Batch`/`Downlink` frames unchanged. Version 1 is:
//!
//! ```text
//! u8  body version (= BODY_VERSION)
//! u16 flags       bits 0-1 QoS, 2 retain, 3 payload_format_utf8, 4 content_type, 5 response_topic,
//!                 6 correlation_data, 7 message_expiry, 8 trace, 9 tracestate, 10 user properties;
//!                 11-15 reserved (must be 0)
//! u64 enqueued_at_ms
//! str16 origin, str16 topic
//! [str16 content_type] [str16 response_topic] [bytes16 correlation_data] [u32 message_expiry]
//! [str16 traceparent [str16 tracestate]]
//! [u16 count, count × (str16 key, str16 value)]
//! payload: every remaining byte
//! ```
//!
//! Absent optionals cost one flag bit, not a length prefix. The payload has no length of its own: the body is
//! always delimited by its container (the queue record, or the entry length in a frame), which saves four
//! bytes per message on a path that runs at hundreds of thousands of messages a second. The 16-bit lengths
//! match MQTT's own limits on topics, strings and binary properties.

use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::buf::{put_bytes16, u32_len, Reader};
use crate::wire::{DecodeError, EncodeError};

/// The envelope body format this build writes, and the only one it reads.
pub const BODY_VERSION: u8 = 1;

const QOS_MASK: u16 = 0b11;
const RETAIN: u16 = 1 << 2;
const PAYLOAD_UTF8: u16 = 1 << 3;
const CONTENT_TYPE: u16 = 1 << 4;
const RESPONSE_TOPIC: u16 = 1 << 5;
const CORRELATION_DATA: u16 = 1 << 6;
const MESSAGE_EXPIRY: u16 = 1 << 7;
const TRACE: u16 = 1 << 8;
const TRACESTATE: u16 = 1 << 9;
const USER_PROPERTIES: u16 = 1 << 10;
const KNOWN_FLAGS: u16 = (1 << 11) - 1;

/// Bytes of a body with no optional field, empty strings and an empty payload: the smallest valid body,
/// which decoders use to bound how many entries a frame can really hold.
pub(crate) const FIXED_BODY_LEN: usize = 1 + 2 + 8 + 2 + 2;

/// MQTT quality of service, as published at the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum QoS {
    /// QoS 0: fire and forget.
    #[default]
    AtMostOnce = 0,
    /// QoS 1: delivered at least once.
    AtLeastOnce = 1,
    /// QoS 2: delivered exactly once (end to end only as far as the brokers honour it).
    ExactlyOnce = 2,
}

/// A byte that is not an MQTT QoS level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid QoS {0}, expected 0, 1 or 2")]
pub struct InvalidQos(pub u8);

impl TryFrom<u8> for QoS {
    type Error = InvalidQos;

    fn try_from(value: u8) -> Result<Self, InvalidQos> {
        match value {
            0 => Ok(Self::AtMostOnce),
            1 => Ok(Self::AtLeastOnce),
            2 => Ok(Self::ExactlyOnce),
            other => Err(InvalidQos(other)),
        }
    }
}

impl From<QoS> for u8 {
    fn from(qos: QoS) -> Self {
        qos as Self
    }
}

/// The MQTT 5 publish properties that must survive a bridge. Topic alias and subscription identifiers are
/// left out on purpose: they are per-connection and meaningless after a hop.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    /// User properties, in order, duplicates allowed (MQTT 5 §3.3.2.3.7).
    pub user: Vec<(String, String)>,
    /// Content type (MIME-ish), as set by the publisher.
    pub content_type: Option<String>,
    /// Topic the publisher wants replies on (request/response).
    pub response_topic: Option<String>,
    /// Opaque request/response correlation data. Shares the body's buffer after decoding.
    pub correlation_data: Option<Bytes>,
    /// Message expiry interval in seconds, as published (the hub may reduce it by time spent in transit).
    pub message_expiry: Option<u32>,
    /// The publisher declared the payload UTF-8 (payload format indicator = 1).
    pub payload_format_utf8: bool,
}

/// W3C trace context carried with a message so a trace spans edge and cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` header value.
    pub traceparent: String,
    /// The `tracestate` header value; `None` rather than empty (OpenTelemetry injects empty ones).
    pub tracestate: Option<String>,
}

/// A message in flight through the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Name of the site where the message entered the mesh.
    pub origin: String,
    /// Per-origin sequence number, assigned by the durable queue; with `origin` it identifies the message
    /// for dedup and acknowledgement.
    pub seq: u64,
    /// MQTT topic as published at the origin (namespacing happens at the hub).
    pub topic: String,
    /// Message payload. Shares the body's buffer after decoding.
    pub payload: Bytes,
    /// QoS as published.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// MQTT 5 properties to reproduce on the far side.
    pub properties: Properties,
    /// Trace context, if the publisher or the agent started a trace.
    pub trace: Option<TraceContext>,
    /// When the edge agent accepted the message, in unix milliseconds. Passed in by the caller, never read
    /// from a clock here.
    pub enqueued_at_ms: u64,
}

impl Envelope {
    /// Appends the body (everything but `seq`) to `buf`, in the format described in the module docs.
    ///
    /// # Errors
    /// [`EncodeError::FieldTooLong`] if a string, the correlation data or the user property count exceeds
    /// 65,535, or the body exceeds `u32::MAX` bytes. `buf` is then left as it was.
    pub fn encode_body(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let start = buf.len();
        let result = self.write_body(buf);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }

    fn write_body(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let len = self.encoded_body_len();
        u32_len(len, "envelope body")?;
        buf.reserve(len);

        let props = &self.properties;
        let mut flags = u16::from(u8::from(self.qos));
        let mut set = |bit: u16, on: bool| {
            if on {
                flags |= bit;
            }
        };
        set(RETAIN, self.retain);
        set(PAYLOAD_UTF8, props.payload_format_utf8);
        set(CONTENT_TYPE, props.content_type.is_some());
        set(RESPONSE_TOPIC, props.response_topic.is_some());
        set(CORRELATION_DATA, props.correlation_data.is_some());
        set(MESSAGE_EXPIRY, props.message_expiry.is_some());
        set(TRACE, self.trace.is_some());
        set(
            TRACESTATE,
            self.trace.as_ref().is_some_and(|t| t.tracestate.is_some()),
        );
        set(USER_PROPERTIES, !props.user.is_empty());

        buf.put_u8(BODY_VERSION);
        buf.put_u16(flags);
        buf.put_u64(self.enqueued_at_ms);
        put_bytes16(buf, "origin", self.origin.as_bytes())?;
        put_bytes16(buf, "topic", self.topic.as_bytes())?;
        if let Some(ct) = &props.content_type {
            put_bytes16(buf, "content_type", ct.as_bytes())?;
        }
        if let Some(rt) = &props.response_topic {
            put_bytes16(buf, "response_topic", rt.as_bytes())?;
        }
        if let Some(cd) = &props.correlation_data {
            put_bytes16(buf, "correlation_data", cd)?;
        }
        if let Some(expiry) = props.message_expiry {
            buf.put_u32(expiry);
        }
        if let Some(trace) = &self.trace {
            put_bytes16(buf, "traceparent", trace.traceparent.as_bytes())?;
            if let Some(state) = &trace.tracestate {
                put_bytes16(buf, "tracestate", state.as_bytes())?;
            }
        }
        if !props.user.is_empty() {
            let count = u16::try_from(props.user.len()).map_err(|_| EncodeError::FieldTooLong {
                field: "user property count",
                len: props.user.len(),
                max: usize::from(u16::MAX),
            })?;
            buf.put_u16(count);
            for (key, value) in &props.user {
                put_bytes16(buf, "user property key", key.as_bytes())?;
                put_bytes16(buf, "user property value", value.as_bytes())?;
            }
        }
        buf.put_slice(&self.payload);
        Ok(())
    }

    /// Bytes [`encode_body`](Self::encode_body) writes when it succeeds; cheap (no encoding), so batchers
    /// can size frames with it.
    pub fn encoded_body_len(&self) -> usize {
        let str16 = |s: &str| 2 + s.len();
        let props = &self.properties;
        let mut len = FIXED_BODY_LEN + self.origin.len() + self.topic.len() + self.payload.len();
        len += props.content_type.as_deref().map_or(0, str16);
        len += props.response_topic.as_deref().map_or(0, str16);
        len += props.correlation_data.as_ref().map_or(0, |cd| 2 + cd.len());
        len += props.message_expiry.map_or(0, |_| 4);
        if let Some(trace) = &self.trace {
            len += str16(&trace.traceparent) + trace.tracestate.as_deref().map_or(0, str16);
        }
        if !props.user.is_empty() {
            len += 2 + props
                .user
                .iter()
                .map(|(k, v)| str16(k) + str16(v))
                .sum::<usize>();
        }
        len
    }

    /// Rebuilds an envelope from a body written by [`encode_body`](Self::encode_body) and the seq the queue
    /// stored beside it.
    ///
    /// Total: any bytes give an envelope or a typed error. The payload and correlation data are slices of
    /// `body` (no copy); strings are copied, since MQTT clients want `String`s.
    ///
    /// # Errors
    /// [`DecodeError::UnsupportedBodyVersion`], [`DecodeError::InvalidFlags`], [`DecodeError::InvalidQos`],
    /// [`DecodeError::Truncated`] or [`DecodeError::InvalidUtf8`].
    pub fn decode_body(seq: u64, body: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let version = r.u8("body version")?;
        if version != BODY_VERSION {
            return Err(DecodeError::UnsupportedBodyVersion(version));
        }
        let flags = r.u16("envelope flags")?;
        if flags & !KNOWN_FLAGS != 0 || (flags & TRACESTATE != 0 && flags & TRACE == 0) {
            return Err(DecodeError::InvalidFlags { flags });
        }
        // The mask keeps two bits, so the cast cannot truncate.
        let qos_bits = (flags & QOS_MASK) as u8;
        let qos = QoS::try_from(qos_bits).map_err(|InvalidQos(q)| DecodeError::InvalidQos(q))?;
        let has = |bit: u16| flags & bit != 0;

        let enqueued_at_ms = r.u64("enqueued_at_ms")?;
        let origin = r.str16("origin")?;
        let topic = r.str16("topic")?;
        let content_type = has(CONTENT_TYPE)
            .then(|| r.str16("content_type"))
            .transpose()?;
        let response_topic = has(RESPONSE_TOPIC)
            .then(|| r.str16("response_topic"))
            .transpose()?;
        let correlation_data = has(CORRELATION_DATA)
            .then(|| r.bytes16("correlation_data"))
            .transpose()?;
        let message_expiry = has(MESSAGE_EXPIRY)
            .then(|| r.u32("message_expiry"))
            .transpose()?;
        let trace = if has(TRACE) {
            let traceparent = r.str16("traceparent")?;
            let tracestate = has(TRACESTATE).then(|| r.str16("tracestate")).transpose()?;
            Some(TraceContext {
                traceparent,
                tracestate,
            })
        } else {
            None
        };
        let mut user = Vec::new();
        if has(USER_PROPERTIES) {
            let count = usize::from(r.u16("user property count")?);
            // Each pair takes at least four bytes, so the remaining bytes bound the count we trust.
            user.reserve(count.min(r.remaining() / 4));
            for _ in 0..count {
                let key = r.str16("user property key")?;
                let value = r.str16("user property value")?;
                user.push((key, value));
            }
        }
        let payload = r.rest();

        Ok(Self {
            origin,
            seq,
            topic,
            payload,
            qos,
            retain: has(RETAIN),
            properties: Properties {
                user,
                content_type,
                response_topic,
                correlation_data,
                message_expiry,
                payload_format_utf8: has(PAYLOAD_UTF8),
            },
            trace,
            enqueued_at_ms,
        })
    }
}

/// The trace context of a stored body, read without decoding the rest: the uplink looks at every body it
/// sends when tracing is on, and most carry no trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TracePeek<'a> {
    /// When the agent committed the message (Unix ms).
    pub enqueued_at_ms: u64,
    /// The `traceparent` the body carries.
    pub traceparent: &'a str,
}

/// The trace context and commit time of a body written by [`Envelope::encode_body`], or `None` when it
/// carries no trace or is not a body this build reads.
#[must_use]
pub fn peek_trace(body: &[u8]) -> Option<TracePeek<'_>> {
    fn skip16(body: &[u8], at: usize) -> Option<usize> {
        let len = body.get(at..at + 2)?;
        Some(at + 2 + usize::from(u16::from_be_bytes([len[0], len[1]])))
    }
    if *body.first()? != BODY_VERSION {
        return None;
    }
    let flags = u16::from_be_bytes(body.get(1..3)?.try_into().ok()?);
    if flags & TRACE == 0 {
        return None;
    }
    let enqueued_at_ms = u64::from_be_bytes(body.get(3..11)?.try_into().ok()?);
    let mut at = skip16(body, 11)?; // origin
    at = skip16(body, at)?; // topic
    for bit in [CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA] {
        if flags & bit != 0 {
            at = skip16(body, at)?;
        }
    }
    if flags & MESSAGE_EXPIRY != 0 {
        at += 4;
    }
    let end = skip16(body, at)?;
    let traceparent = std::str::from_utf8(body.get(at + 2..end)?).ok()?;
    Some(TracePeek {
        enqueued_at_ms,
        traceparent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::arb::arb_envelope;
    use proptest::prelude::*;

    fn minimal() -> Envelope {
        Envelope {
            origin: "plant1".into(),
            seq: 7,
            topic: "line1/temp".into(),
            payload: Bytes::from_static(b"21.5"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            trace: None,
            enqueued_at_ms: 1_700_000_000_000,
        }
    }

    fn body_of(env: &Envelope) -> Bytes {
        let mut buf = BytesMut::new();
        env.encode_body(&mut buf).expect("encodable");
        buf.freeze()
    }

    #[test]
    fn qos_try_from_table() {
        let cases = [
            (0u8, Ok(QoS::AtMostOnce)),
            (1, Ok(QoS::AtLeastOnce)),
            (2, Ok(QoS::ExactlyOnce)),
            (3, Err(InvalidQos(3))),
            (255, Err(InvalidQos(255))),
        ];
        for (byte, want) in cases {
            assert_eq!(QoS::try_from(byte), want, "byte {byte}");
            if let Ok(q) = want {
                assert_eq!(u8::from(q), byte);
            }
        }
    }

    #[test]
    fn minimal_body_is_compact() {
        let env = minimal();
        let body = body_of(&env);
        // version + flags + timestamp + two str16 + payload.
        assert_eq!(body.len(), 1 + 2 + 8 + (2 + 6) + (2 + 10) + 4);
        assert_eq!(body.len(), env.encoded_body_len());
        assert_eq!(Envelope::decode_body(7, body), Ok(env));
    }

    #[test]
    fn decode_errors_table() {
        let good = body_of(&minimal()).to_vec();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            Bytes::from(b)
        };
        let cases: Vec<(&str, Bytes, DecodeError)> = vec![
            (
                "empty",
                Bytes::new(),
                DecodeError::Truncated {
                    what: "body version",
                    needed: 1,
                    available: 0,
                },
            ),
            (
                "future version",
                with(&|b| b[0] = 2),
                DecodeError::UnsupportedBodyVersion(2),
            ),
            ("qos 3", with(&|b| b[2] |= 0b11), DecodeError::InvalidQos(3)),
            (
                "reserved flag",
                with(&|b| b[1] |= 0x80),
                DecodeError::InvalidFlags { flags: 0x8001 },
            ),
            (
                "tracestate without trace",
                with(&|b| b[1] |= 0x02),
                DecodeError::InvalidFlags { flags: 0x0201 },
            ),
            (
                "origin length past the end",
                with(&|b| b[11] = 0xFF),
                DecodeError::Truncated {
                    what: "origin",
                    needed: 0xFF06,
                    available: good.len() - 13,
                },
            ),
            (
                "origin not utf-8",
                with(&|b| b[13] = 0xFF),
                DecodeError::InvalidUtf8 { field: "origin" },
            ),
            (
                "content type announced but missing",
                Bytes::from(vec![1, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                DecodeError::Truncated {
                    what: "content_type",
                    needed: 2,
                    available: 0,
                },
            ),
        ];
        for (name, body, want) in cases {
            assert_eq!(Envelope::decode_body(1, body), Err(want), "{name}");
        }
    }

    #[test]
    fn too_long_field_leaves_buffer_untouched() {
        let mut env = minimal();
        env.properties.user = vec![("k".into(), "x".repeat(70_000))];
        let mut buf = BytesMut::from(&b"prefix"[..]);
        let err = env.encode_body(&mut buf).expect_err("value over u16");
        assert_eq!(
            err,
            EncodeError::FieldTooLong {
                field: "user property value",
                len: 70_000,
                max: 65_535
            }
        );
        assert_eq!(&buf[..], b"prefix");

        let mut env = minimal();
        env.properties.user = vec![(String::new(), String::new()); 70_000];
        let err = env.encode_body(&mut buf).expect_err("count over u16");
        assert!(matches!(
            err,
            EncodeError::FieldTooLong {
                field: "user property count",
                ..
            }
        ));
        assert_eq!(&buf[..], b"prefix");
    }

    #[test]
    fn decoded_payload_shares_the_body_buffer() {
        let mut env = minimal();
        env.properties.correlation_data = Some(Bytes::from_static(b"corr"));
        let body = body_of(&env);
        let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        let got = Envelope::decode_body(1, body.clone()).expect("valid");
        assert!(range.contains(&(got.payload.as_ptr() as usize)));
        let cd = got.properties.correlation_data.expect("present");
        assert!(range.contains(&(cd.as_ptr() as usize)));
    }

    proptest! {
        #[test]
        fn body_round_trips(env in arb_envelope()) {
            let body = body_of(&env);
            prop_assert_eq!(body.len(), env.encoded_body_len());
            prop_assert_eq!(Envelope::decode_body(env.seq, body), Ok(env));
        }

        #[test]
        fn peek_trace_reads_what_decode_reads(env in arb_envelope()) {
            let body = body_of(&env);
            let peek = peek_trace(&body);
            prop_assert_eq!(peek.map(|p| p.traceparent), env.trace.as_ref().map(|t| t.traceparent.as_str()));
            if let Some(p) = peek {
                prop_assert_eq!(p.enqueued_at_ms, env.enqueued_at_ms);
            }
        }

        #[test]
        fn peek_trace_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = peek_trace(&bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), seq: u64) {
            // Whatever comes out must re-encode to something that decodes the same.
            if let Ok(env) = Envelope::decode_body(seq, Bytes::from(bytes)) {
                let body = body_of(&env);
                prop_assert_eq!(Envelope::decode_body(seq, body), Ok(env));
            }
        }

        #[test]
        fn mutated_bodies_never_panic(
            env in arb_envelope(),
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut body = BytesMut::new();
            env.encode_body(&mut body).expect("encodable");
            for (at, byte) in flips {
                let i = at.index(body.len());
                body[i] ^= byte;
            }
            if let Ok(decoded) = Envelope::decode_body(env.seq, body.freeze()) {
                let again = body_of(&decoded);
                prop_assert_eq!(Envelope::decode_body(env.seq, again), Ok(decoded));
            }
        }

        #[test]
        fn encoding_appends_after_existing_bytes(env in arb_envelope(), prefix in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut buf = BytesMut::from(&prefix[..]);
            env.encode_body(&mut buf).expect("encodable");
            prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
            let body = buf.freeze().slice(prefix.len()..);
            prop_assert_eq!(Envelope::decode_body(env.seq, body), Ok(env));
        }
    }
}
