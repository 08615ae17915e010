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
//! "Message size" is the payload length in bytes, the quantity the hub checks.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::topic::MAX_TOPIC_LEN;

/// MQTT 5 reason code "Topic Name invalid" (§3.4.2.1): "the Topic Name is not malformed, but is not
/// accepted by this Client or Server". Used for a topic too long once namespaced.
pub const REASON_TOPIC_NAME_INVALID: u8 = 0x90;
/// MQTT 5 reason code "Implementation specific error" (§3.4.2.1): "the PUBLISH is valid but the receiver
/// is not willing to accept it". Used for a payload over the path's maximum.
///
/// Not 0x95 "Packet too large", although Mosquitto sends that: the MQTT 5 tables of PUBACK (§3.4.2.1) and
/// PUBREC (§3.5.2.1) reason codes do not list 0x95 (it is a CONNACK/DISCONNECT code), and strict clients
/// treat an unlisted code as a malformed packet and drop the connection: rumqttc 0.25, which this
/// workspace uses, fails to decode such a PUBACK (`v5/mqttbytes/v5/puback.rs`, `reason()`). A client that
/// resends the message after reconnecting would then be stuck on it, which is what refusing prevents.
pub const REASON_IMPLEMENTATION_SPECIFIC: u8 = 0x83;

/// The largest message and the longest site-local topic the path carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PathLimits {
    /// Largest payload in bytes.
    pub max_message_size: u32,
    /// Longest topic in bytes as the site's publisher writes it (before the hub prefixes its namespace).
    pub max_topic_len: u16,
}

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
}

impl Refusal {
    /// The MQTT 5 PUBACK/PUBREC reason code that tells a v5 publisher why.
    #[must_use]
    pub const fn v5_reason(&self) -> u8 {
        match self {
            Self::PayloadTooLarge { .. } => REASON_IMPLEMENTATION_SPECIFIC,
            Self::TopicTooLong { .. } => REASON_TOPIC_NAME_INVALID,
        }
    }

    /// A short label for logs and counters.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. } => "too_large",
            Self::TopicTooLong { .. } => "topic_too_long",
        }
    }
}

/// Why a persisted [`PathLimits`] text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsTextError {
    /// A line is not `key = value` with a known key and a number in range.
    #[error("line {line}: expected `max_message_size = <u32>` or `max_topic_len = <u16>`")]
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
    };

    /// The tighter of two limits, field by field: what both parts of the path carry.
    #[must_use]
    pub fn tightest(self, other: Self) -> Self {
        Self {
            max_message_size: self.max_message_size.min(other.max_message_size),
            max_topic_len: self.max_topic_len.min(other.max_topic_len),
        }
    }

    /// Whether a message with this topic and payload length crosses the path.
    ///
    /// # Errors
    /// The [`Refusal`] saying which limit it breaks (payload first: it is the common case).
    pub fn check(&self, topic_len: usize, payload_len: usize) -> Result<(), Refusal> {
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
        Ok(())
    }

    /// The persisted form: two `key = value` lines (TOML-compatible, readable by an operator).
    #[must_use]
    pub fn to_text(&self) -> String {
        format!(
            "max_message_size = {}\nmax_topic_len = {}\n",
            self.max_message_size, self.max_topic_len
        )
    }

    /// Reads what [`to_text`](Self::to_text) wrote; blank lines and `#` comments are skipped.
    ///
    /// # Errors
    /// [`LimitsTextError`] for an unknown key, a value out of range or a missing key.
    pub fn from_text(text: &str) -> Result<Self, LimitsTextError> {
        let mut message = None;
        let mut topic = None;
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
        })
    }
}

/// The limits in force on a running agent: its configured maximum combined with the hub's last
/// announcement, readable from any task without a lock (one atomic word, so a reader never sees half an
/// update), plus the count of messages refused because of them.
#[derive(Debug)]
pub struct SharedLimits {
    configured: PathLimits,
    current: AtomicU64,
    refused: AtomicU64,
}

impl SharedLimits {
    /// Limits from the agent's own config; the topic length is bounded only by MQTT until a hub announces
    /// its namespace room.
    #[must_use]
    pub fn new(configured_max_message_size: u32) -> Self {
        let configured = PathLimits {
            max_message_size: configured_max_message_size,
            max_topic_len: u16::try_from(MAX_TOPIC_LEN).unwrap_or(u16::MAX),
        };
        Self {
            configured,
            current: AtomicU64::new(pack(configured)),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes the hub's announcement (from `Welcome`, or persisted from an earlier one) into account: the
    /// limits become the tightest of the configured ones and `announced`. A later announcement replaces
    /// an earlier one (a hub may raise its limit). Returns the limits now in force.
    pub fn announce(&self, announced: PathLimits) -> PathLimits {
        let now = self.configured.tightest(announced);
        self.current.store(pack(now), Ordering::Release);
        now
    }

    /// The limits in force.
    #[must_use]
    pub fn current(&self) -> PathLimits {
        unpack(self.current.load(Ordering::Acquire))
    }

    /// Checks a message against [`current`](Self::current), counting a refusal.
    ///
    /// # Errors
    /// As [`PathLimits::check`].
    pub fn check(&self, topic_len: usize, payload_len: usize) -> Result<(), Refusal> {
        let result = self.current().check(topic_len, payload_len);
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

const fn pack(limits: PathLimits) -> u64 {
    ((limits.max_message_size as u64) << 16) | limits.max_topic_len as u64
}

#[allow(clippy::cast_possible_truncation)] // the shifts select exactly 32 and 16 bits
const fn unpack(word: u64) -> PathLimits {
    PathLimits {
        max_message_size: (word >> 16) as u32,
        max_topic_len: word as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_table() {
        let limits = PathLimits {
            max_message_size: 10,
            max_topic_len: 5,
        };
        let cases: &[(usize, usize, Option<Refusal>)] = &[
            (5, 10, None),
            (0, 0, None),
            (5, 11, Some(Refusal::PayloadTooLarge { len: 11, max: 10 })),
            (6, 10, Some(Refusal::TopicTooLong { len: 6, max: 5 })),
            // Both broken: the payload is reported.
            (6, 11, Some(Refusal::PayloadTooLarge { len: 11, max: 10 })),
        ];
        for &(topic, payload, want) in cases {
            assert_eq!(
                limits.check(topic, payload).err(),
                want,
                "{topic} {payload}"
            );
        }
        assert_eq!(
            Refusal::PayloadTooLarge { len: 1, max: 0 }.v5_reason(),
            0x83
        );
        assert_eq!(Refusal::TopicTooLong { len: 1, max: 0 }.v5_reason(), 0x90);
    }

    #[test]
    fn shared_limits_take_the_tightest_and_follow_later_announcements() {
        let shared = SharedLimits::new(1000);
        assert_eq!(
            shared.current(),
            PathLimits {
                max_message_size: 1000,
                max_topic_len: u16::MAX
            }
        );
        let hub = PathLimits {
            max_message_size: 500,
            max_topic_len: 100,
        };
        assert_eq!(shared.announce(hub), hub);
        assert!(shared.check(100, 500).is_ok());
        assert!(shared.check(101, 1).is_err());
        assert!(shared.check(1, 501).is_err());
        assert_eq!(shared.refused(), 2);
        // A hub that raises its limit above the agent's config: the config still bounds.
        let raised = PathLimits {
            max_message_size: 5000,
            max_topic_len: 200,
        };
        assert_eq!(
            shared.announce(raised),
            PathLimits {
                max_message_size: 1000,
                max_topic_len: 200
            }
        );
    }

    #[test]
    fn text_round_trip_and_errors() {
        for limits in [
            PathLimits::UNBOUNDED,
            PathLimits {
                max_message_size: 0,
                max_topic_len: 0,
            },
            PathLimits {
                max_message_size: 262_144,
                max_topic_len: 65_512,
            },
        ] {
            assert_eq!(PathLimits::from_text(&limits.to_text()), Ok(limits));
        }
        assert_eq!(
            PathLimits::from_text("# c\n\nmax_topic_len = 3\nmax_message_size=4\n"),
            Ok(PathLimits {
                max_message_size: 4,
                max_topic_len: 3
            })
        );
        assert_eq!(
            PathLimits::from_text("max_message_size = 4\nmax_topic_len = 70000\n"),
            Err(LimitsTextError::BadLine { line: 2 })
        );
        assert_eq!(
            PathLimits::from_text("max_message_size = 4\n"),
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
