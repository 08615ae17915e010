//! The limits a message must meet to cross the whole path (local broker → agent queue → hub → cloud
//! broker), checked once, where the publisher can still be told: at PUBLISH time on the agent.
//!
//! Why here and not at the hub: the hub only sees a message after the agent acknowledged it to its
//! publisher, so a refusal there is "acknowledged, then dropped" (issue 7). The hub knows its limits (its
//! `limits.max_message_size` and the namespace prefix it puts in front of every topic of a site), so it
//! announces them in `Welcome` (see [`crate::wire`]); the agent combines them with its own configured
//! maximum ([`SharedLimits`]) and persists the last announcement ([`PathLimits::to_text`]) so that a
//! restarted agent refuses correctly before it reaches the hub again.
//!
//! "Message size" is the payload length in bytes, the quantity the hub checks. A third limit is the
//! agent↔hub frame size: a queue entry that does not fit one frame could never be sent, and the uplink
//! would stop at it for good, so a message whose entry would not fit is refused too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use crate::topic::MAX_TOPIC_LEN;

/// MQTT 5 reason code "Topic Name invalid" (§3.4.2.1): "the Topic Name is not malformed, but is not
/// accepted by this Client or Server". Used for a topic too long once namespaced.
pub const REASON_TOPIC_NAME_INVALID: u8 = 0x90;
/// MQTT 5 reason code "Implementation specific error" (§3.4.2.1): "the PUBLISH is valid but the receiver
/// is not willing to accept it". Used for a payload over the path's maximum.
///
/// Not 0x95 "Packet too large", although Mosquitto sends that: the MQTT 5 tables of PUBACK (§3.4.2.1) and
/// PUBREC (§3.5.2.1) reason codes do not list 0x95 (it is a CONNACK/DISCONNECT code), and strict clients
/// treat an unlisted code as a malformed packet and drop the connection: with 0x95 here, the rumqttc 0.25
/// v5 client of `broker/tests/front.rs` fails with "Invalid return code received as response for connect
/// = 149" instead of reading the PUBACK. A client that resends the message after reconnecting would then
/// be stuck on it, which is what refusing prevents.
pub const REASON_IMPLEMENTATION_SPECIFIC: u8 = 0x83;

/// The largest message and the longest site-local topic the path carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PathLimits {
    /// Largest payload in bytes.
    pub max_message_size: u32,
    /// Longest topic in bytes as the site's publisher writes it (before the hub prefixes its namespace).
    pub max_topic_len: u16,
    /// Largest agent↔hub frame (type byte plus body); a queue entry must fit one with
    /// [`FRAME_ENTRY_OVERHEAD`] bytes of framing.
    pub max_frame_size: u32,
}

/// Bytes a frame adds around one entry body: type byte and entry count (5), seq and body length (12).
pub const FRAME_ENTRY_OVERHEAD: usize = 5 + 12;

/// Bytes an envelope body (`crate::envelope`) may have beyond the MQTT PUBLISH packet it was made
/// from, not counting the origin: version, flags, enqueue time, origin length (1 + 2 + 8 + 2) and the
/// user property count (2). Every other envelope field costs at most what it costs in the PUBLISH (a
/// property's identifier byte is dropped, the payload has no length, topic alias and subscription
/// identifiers are not kept), so `entry ≤ packet + ENVELOPE_EXTRA + origin` once the topic is
/// alias-resolved.
pub const ENVELOPE_EXTRA: usize = 15;

/// Why a message cannot cross the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The payload is over [`PathLimits::max_message_size`].
    #[error("payload of {len} bytes exceeds the path's maximum message size of {max} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The limit in force.
        max: u32,
    },
    /// The topic is over [`PathLimits::max_topic_len`]: the hub could not prefix its namespace.
    #[error("topic of {len} bytes exceeds the {max} bytes left once the hub prefixes the site namespace")]
    TopicTooLong {
        /// Topic length.
        len: usize,
        /// The limit in force.
        max: u16,
    },
    /// The queue entry (payload, topic and properties) would not fit one agent↔hub frame.
    #[error("message of up to {len} bytes with its topic and properties does not fit the {max_frame_size}-byte frame to the hub")]
    EntryTooLarge {
        /// The entry length (or an upper bound of it).
        len: usize,
        /// The frame limit in force.
        max_frame_size: u32,
    },
}

impl Refusal {
    /// The MQTT 5 PUBACK/PUBREC reason code that tells a v5 publisher why.
    #[must_use]
    pub const fn v5_reason(&self) -> u8 {
        match self {
            Self::PayloadTooLarge { .. } | Self::EntryTooLarge { .. } => {
                REASON_IMPLEMENTATION_SPECIFIC
            }
            Self::TopicTooLong { .. } => REASON_TOPIC_NAME_INVALID,
        }
    }

    /// A short label for logs and counters.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. } => "too_large",
            Self::TopicTooLong { .. } => "topic_too_long",
            Self::EntryTooLarge { .. } => "entry_too_large",
        }
    }
}

/// Why a persisted [`PathLimits`] text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsTextError {
    /// A line is not `key = value` with a known key and a number in range.
    #[error("line {line}: expected `max_message_size = <u32>`, `max_topic_len = <u16>` or `max_frame_size = <u32>`")]
    BadLine {
        /// 1-based line number.
        line: usize,
    },
    /// A key is missing.
    #[error("missing {key}")]
    Missing {
        /// The missing key.
        key: &'static str,
    },
}

impl PathLimits {
    /// No limit beyond what MQTT itself allows.
    pub const UNBOUNDED: Self = Self {
        max_message_size: u32::MAX,
        max_topic_len: u16::MAX,
        max_frame_size: u32::MAX,
    };

    /// The tighter of two limits, field by field: what both parts of the path carry.
    #[must_use]
    pub fn tightest(self, other: Self) -> Self {
        Self {
            max_message_size: self.max_message_size.min(other.max_message_size),
            max_topic_len: self.max_topic_len.min(other.max_topic_len),
            max_frame_size: self.max_frame_size.min(other.max_frame_size),
        }
    }

    /// Whether a message with this topic and payload length, whose queue entry is at most `entry_len`
    /// bytes, crosses the path.
    ///
    /// # Errors
    /// The [`Refusal`] saying which limit it breaks (payload first: it is the common case).
    pub fn check(
        &self,
        topic_len: usize,
        payload_len: usize,
        entry_len: usize,
    ) -> Result<(), Refusal> {
        if payload_len > self.max_message_size as usize {
            return Err(Refusal::PayloadTooLarge {
                len: payload_len,
                max: self.max_message_size,
            });
        }
        if topic_len > usize::from(self.max_topic_len) {
            return Err(Refusal::TopicTooLong {
                len: topic_len,
                max: self.max_topic_len,
            });
        }
        if entry_len.saturating_add(FRAME_ENTRY_OVERHEAD) > self.max_frame_size as usize {
            return Err(Refusal::EntryTooLarge {
                len: entry_len,
                max_frame_size: self.max_frame_size,
            });
        }
        Ok(())
    }

    /// The persisted form: two `key = value` lines (TOML-compatible, readable by an operator).
    #[must_use]
    pub fn to_text(&self) -> String {
        format!(
            "max_message_size = {}\nmax_topic_len = {}\nmax_frame_size = {}\n",
            self.max_message_size, self.max_topic_len, self.max_frame_size
        )
    }

    /// Reads what [`to_text`](Self::to_text) wrote; blank lines and `#` comments are skipped.
    ///
    /// # Errors
    /// [`LimitsTextError`] for an unknown key, a value out of range or a missing key.
    pub fn from_text(text: &str) -> Result<Self, LimitsTextError> {
        let mut message = None;
        let mut topic = None;
        let mut frame = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = LimitsTextError::BadLine { line: i + 1 };
            let (key, value) = line.split_once('=').ok_or_else(|| bad.clone())?;
            let value = value.trim();
            match key.trim() {
                "max_message_size" => message = Some(value.parse::<u32>().map_err(|_| bad)?),
                "max_topic_len" => topic = Some(value.parse::<u16>().map_err(|_| bad)?),
                "max_frame_size" => frame = Some(value.parse::<u32>().map_err(|_| bad)?),
                _ => return Err(bad),
            }
        }
        Ok(Self {
            max_message_size: message.ok_or(LimitsTextError::Missing {
                key: "max_message_size",
            })?,
            max_topic_len: topic.ok_or(LimitsTextError::Missing {
                key: "max_topic_len",
            })?,
            max_frame_size: frame.ok_or(LimitsTextError::Missing {
                key: "max_frame_size",
            })?,
        })
    }
}

/// The limits in force on a running agent: its configured maximum combined with the hub's last
/// announcement, shared by every connection (a read lock per check: announcements are rare), plus the
/// count of messages refused because of them.
#[derive(Debug)]
pub struct SharedLimits {
    configured: PathLimits,
    current: RwLock<PathLimits>,
    origin_len: usize,
    refused: AtomicU64,
}

impl SharedLimits {
    /// Limits from the agent's own config (`uplink.max_message_size`, `uplink.max_frame_size`); the topic
    /// length is bounded only by MQTT until a hub announces its namespace room. `origin` is the site
    /// name every queue entry carries.
    #[must_use]
    pub fn new(max_message_size: u32, max_frame_size: u32, origin: &str) -> Self {
        let configured = PathLimits {
            max_message_size,
            max_topic_len: u16::try_from(MAX_TOPIC_LEN).unwrap_or(u16::MAX),
            max_frame_size,
        };
        Self {
            configured,
            current: RwLock::new(configured),
            origin_len: origin.len(),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes the hub's announcement (from `Welcome`, or persisted from an earlier one) into account: the
    /// limits become the tightest of the configured ones and `announced`. A later announcement replaces
    /// an earlier one (a hub may raise its limit). Returns the limits now in force.
    pub fn announce(&self, announced: PathLimits) -> PathLimits {
        let now = self.configured.tightest(announced);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = now;
        now
    }

    /// The limits in force.
    #[must_use]
    pub fn current(&self) -> PathLimits {
        *self.current.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// An upper bound of the queue entry made from an MQTT PUBLISH of `packet_len` bytes (fixed header
    /// included) whose topic, once alias-resolved, is `extra_topic_len` bytes longer than in the packet
    /// (non-zero only for a v5 PUBLISH that names its topic by alias); see [`ENVELOPE_EXTRA`].
    #[must_use]
    pub const fn entry_bound(&self, packet_len: usize, extra_topic_len: usize) -> usize {
        packet_len + extra_topic_len + ENVELOPE_EXTRA + self.origin_len
    }

    /// The length of the origin every entry carries (the site name).
    #[must_use]
    pub const fn origin_len(&self) -> usize {
        self.origin_len
    }

    /// Checks a message against [`current`](Self::current), counting a refusal.
    ///
    /// # Errors
    /// As [`PathLimits::check`].
    pub fn check(
        &self,
        topic_len: usize,
        payload_len: usize,
        entry_len: usize,
    ) -> Result<(), Refusal> {
        let result = self.current().check(topic_len, payload_len, entry_len);
        if result.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// How many messages [`check`](Self::check) refused since start.
    #[must_use]
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn limits(max_message_size: u32, max_topic_len: u16, max_frame_size: u32) -> PathLimits {
        PathLimits {
            max_message_size,
            max_topic_len,
            max_frame_size,
        }
    }

    #[test]
    fn check_table() {
        // Entries up to 100 - 17 = 83 bytes fit the frame.
        let l = limits(10, 5, 100);
        let cases: &[(usize, usize, usize, Option<Refusal>)] = &[
            (5, 10, 83, None),
            (0, 0, 0, None),
            (
                5,
                11,
                20,
                Some(Refusal::PayloadTooLarge { len: 11, max: 10 }),
            ),
            (6, 10, 20, Some(Refusal::TopicTooLong { len: 6, max: 5 })),
            (
                5,
                10,
                84,
                Some(Refusal::EntryTooLarge {
                    len: 84,
                    max_frame_size: 100,
                }),
            ),
            // Several broken: the payload is reported first, then the topic.
            (
                6,
                11,
                500,
                Some(Refusal::PayloadTooLarge { len: 11, max: 10 }),
            ),
            (6, 10, 500, Some(Refusal::TopicTooLong { len: 6, max: 5 })),
        ];
        for &(topic, payload, entry, want) in cases {
            assert_eq!(
                l.check(topic, payload, entry).err(),
                want,
                "{topic} {payload} {entry}"
            );
        }
        assert_eq!(
            Refusal::PayloadTooLarge { len: 1, max: 0 }.v5_reason(),
            0x83
        );
        assert_eq!(
            Refusal::EntryTooLarge {
                len: 1,
                max_frame_size: 0
            }
            .v5_reason(),
            0x83
        );
        assert_eq!(Refusal::TopicTooLong { len: 1, max: 0 }.v5_reason(), 0x90);
    }

    #[test]
    fn shared_limits_take_the_tightest_and_follow_later_announcements() {
        let shared = SharedLimits::new(1000, 10_000, "line1");
        assert_eq!(shared.current(), limits(1000, u16::MAX, 10_000));
        let hub = limits(500, 100, 2000);
        assert_eq!(shared.announce(hub), hub);
        assert!(shared.check(100, 500, 1983).is_ok());
        assert!(shared.check(101, 1, 10).is_err());
        assert!(shared.check(1, 501, 10).is_err());
        assert!(shared.check(1, 1, 1984).is_err());
        assert_eq!(shared.refused(), 3);
        // A hub that raises its limits above the agent's config: the config still bounds.
        assert_eq!(
            shared.announce(limits(5000, 200, 1 << 30)),
            limits(1000, 200, 10_000)
        );
        // The entry bound adds the envelope's extra fields and the origin to the packet.
        assert_eq!(shared.entry_bound(100, 0), 100 + ENVELOPE_EXTRA + 5);
        assert_eq!(shared.entry_bound(100, 7), 107 + ENVELOPE_EXTRA + 5);
    }

    /// The bound of [`ENVELOPE_EXTRA`] holds for real envelopes made from real PUBLISH packets, with and
    /// without properties.
    #[test]
    fn entry_bound_covers_the_encoded_envelope() {
        use crate::envelope::{Envelope, Properties, QoS as EnvQoS};
        use crate::mqtt::{encode_publish, ProtocolVersion, Publish, PublishProperties, QoS};
        use bytes::{Bytes, BytesMut};

        let shared = SharedLimits::new(u32::MAX, u32::MAX, "a-site-name");
        let user = vec![
            ("k".to_owned(), "v".to_owned()),
            ("a".to_owned(), String::new()),
        ];
        for (version, with_props) in [
            (ProtocolVersion::V3_1_1, false),
            (ProtocolVersion::V5, false),
            (ProtocolVersion::V5, true),
        ] {
            let properties = if with_props {
                PublishProperties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(9),
                    response_topic: Some("r".into()),
                    correlation_data: Some(Bytes::from_static(b"c")),
                    user_properties: user.clone(),
                    content_type: Some("t".into()),
                    ..PublishProperties::default()
                }
            } else {
                PublishProperties::default()
            };
            let publish = Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "t/x".into(),
                packet_id: None,
                properties: properties.clone(),
                payload: Bytes::from_static(b"payload"),
            };
            let mut packet = BytesMut::new();
            encode_publish(&publish, version, &mut packet).expect("encodable");
            let env = Envelope {
                origin: "a-site-name".into(),
                seq: 1,
                topic: publish.topic.clone(),
                payload: publish.payload.clone(),
                qos: EnvQoS::AtMostOnce,
                retain: false,
                properties: Properties {
                    user: properties.user_properties.clone(),
                    content_type: properties.content_type.clone(),
                    response_topic: properties.response_topic.clone(),
                    correlation_data: properties.correlation_data.clone(),
                    message_expiry: properties.message_expiry_interval,
                    payload_format_utf8: properties.payload_format_indicator == Some(1),
                },
                trace: None,
                enqueued_at_ms: 0,
            };
            let mut body = BytesMut::new();
            env.encode_body(&mut body).expect("encodable");
            assert!(
                body.len() <= shared.entry_bound(packet.len(), 0),
                "{version:?} props={with_props}: body {} > bound {}",
                body.len(),
                shared.entry_bound(packet.len(), 0)
            );
        }
    }

    #[test]
    fn text_round_trip_and_errors() {
        for l in [
            PathLimits::UNBOUNDED,
            limits(0, 0, 0),
            limits(262_144, 65_512, 8 << 20),
        ] {
            assert_eq!(PathLimits::from_text(&l.to_text()), Ok(l));
        }
        assert_eq!(
            PathLimits::from_text(
                "# c\n\nmax_topic_len = 3\nmax_message_size=4\nmax_frame_size = 5\n"
            ),
            Ok(limits(4, 3, 5))
        );
        assert_eq!(
            PathLimits::from_text("max_message_size = 4\nmax_topic_len = 70000\n"),
            Err(LimitsTextError::BadLine { line: 2 })
        );
        assert_eq!(
            PathLimits::from_text("max_message_size = 4\nmax_frame_size = 9\n"),
            Err(LimitsTextError::Missing {
                key: "max_topic_len"
            })
        );
        assert_eq!(
            PathLimits::from_text("colour = blue\n"),
            Err(LimitsTextError::BadLine { line: 1 })
        );
    }
}
