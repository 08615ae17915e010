//! Value types used by the config model: byte sizes, `host:port` endpoints and redacted secrets.
//!
//! They live apart from the config trees because the edge agent and the cloud hub both use them, and because
//! each one parses from the exact text an operator writes (`"64MiB"`, `"hub.example.com:4433"`), which is
//! easier to test as a plain `FromStr` table than through a whole config file.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, written in config files as an integer (`1048576`) or a string with a unit (`"1MiB"`).
///
/// Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024 and decimal units (`KB`, `MB`, `GB`, `TB`)
/// powers of 1000; units are case-insensitive and may be separated from the number by spaces. A fraction is
/// allowed (`"1.5GiB"`) and truncated to whole bytes. Bare `k`/`m`/`g` are refused on purpose: whether they mean
/// 1000 or 1024 is exactly the ambiguity a config file should not carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// One kibibyte (1024 bytes).
    pub const KIB: Self = Self(1024);
    /// One mebibyte (1024² bytes).
    pub const MIB: Self = Self(1024 * 1024);
    /// One gibibyte (1024³ bytes).
    pub const GIB: Self = Self(1024 * 1024 * 1024);

    /// `n` kibibytes; `const` so defaults and limits can be written as constants.
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// `n` gibibytes.
    pub const fn gib(n: u64) -> Self {
        Self(n * 1024 * 1024 * 1024)
    }

    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The size in bytes as `usize`, saturating on 32-bit targets where a configured size can exceed memory.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

/// Why a byte-size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    /// The text was empty or only whitespace.
    #[error("empty byte size")]
    Empty,
    /// The text did not start with a decimal number (negative numbers included).
    #[error("invalid byte size `{input}`: expected a number optionally followed by a unit, like `64MiB`")]
    InvalidNumber {
        /// The text as given.
        input: String,
    },
    /// The number was followed by something that is not one of the known units.
    #[error(
        "unknown byte-size unit `{unit}`: expected one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
    )]
    UnknownUnit {
        /// The unit as given.
        unit: String,
    },
    /// The value does not fit in 64 bits.
    #[error("byte size `{input}` is too large")]
    Overflow {
        /// The text as given.
        input: String,
    },
}

/// Binary units first so that `Display` prefers them when both divide exactly.
const UNITS: [(&str, u64); 9] = [
    ("tib", 1 << 40),
    ("gib", 1 << 30),
    ("mib", 1 << 20),
    ("kib", 1 << 10),
    ("tb", 1_000_000_000_000),
    ("gb", 1_000_000_000),
    ("mb", 1_000_000),
    ("kb", 1_000),
    ("b", 1),
];

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        if text.is_empty() {
            return Err(ByteSizeError::Empty);
        }
        let number_end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(number_end);
        let unit = unit.trim_start();
        let invalid = || ByteSizeError::InvalidNumber {
            input: input.to_owned(),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let multiplier = if unit.is_empty() {
            1
        } else {
            let lower = unit.to_ascii_lowercase();
            UNITS
                .iter()
                .find(|(name, _)| *name == lower)
                .map(|(_, m)| *m)
                .ok_or_else(|| ByteSizeError::UnknownUnit {
                    unit: unit.to_owned(),
                })?
        };
        let overflow = || ByteSizeError::Overflow {
            input: input.to_owned(),
        };
        let whole: u64 = whole.parse().map_err(|_| overflow())?;
        let mut bytes = u128::from(whole) * u128::from(multiplier);
        if !fraction.is_empty() {
            // Exact integer arithmetic: digits * multiplier / 10^len, so "1.5GiB" is exactly 1.5 * 2^30.
            // Digits beyond 19 cannot change a u64 result and would overflow the power of ten.
            let digits = &fraction[..fraction.len().min(19)];
            let numerator: u128 = digits.parse().map_err(|_| invalid())?;
            let denominator = 10u128.pow(u32::try_from(digits.len()).map_err(|_| invalid())?);
            bytes += numerator * u128::from(multiplier) / denominator;
        }
        u64::try_from(bytes).map(Self).map_err(|_| overflow())
    }
}

impl fmt::Display for ByteSize {
    /// Writes the largest unit that divides the size exactly (`64MiB`, `1GB`), else plain bytes, so that a
    /// serialized config reads back to the same value and stays readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 9] = ["TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB", "B"];
        if self.0 == 0 {
            return f.write_str("0B");
        }
        for ((_, multiplier), name) in UNITS.iter().zip(NAMES) {
            if self.0 % multiplier == 0 {
                return write!(f, "{}{name}", self.0 / multiplier);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ByteSizeVisitor;

        impl Visitor<'_> for ByteSizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte count or a size string like \"64MiB\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| {
                    E::invalid_value(de::Unexpected::Signed(v), &"a non-negative byte count")
                })
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

/// A `host:port` endpoint to connect to, where the host may be a DNS name, an IPv4 address or a bracketed IPv6
/// address (`[::1]:4433`).
///
/// Kept as text rather than a resolved `SocketAddr` because resolution is I/O (not allowed in `shared`) and must
/// be redone on every reconnect so that a hub moving to a new address is followed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    host: String,
    port: u16,
}

impl HostPort {
    /// The host part, without IPv6 brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub const fn port(&self) -> u16 {
        self.port
    }
}

/// Why a `host:port` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// There was no `:port` suffix.
    #[error("`{input}` has no port: expected host:port")]
    MissingPort {
        /// The text as given.
        input: String,
    },
    /// The host part was empty, or an IPv6 address was not bracketed.
    #[error("`{input}` has an invalid host: expected a name, an IPv4 address or [IPv6]")]
    InvalidHost {
        /// The text as given.
        input: String,
    },
    /// The port was not a number in 1..=65535 (0 cannot be connected to).
    #[error("`{input}` has an invalid port: expected 1..=65535")]
    InvalidPort {
        /// The text as given.
        input: String,
    },
}

impl FromStr for HostPort {
    type Err = HostPortError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (host, port) = input
            .rsplit_once(':')
            .ok_or_else(|| HostPortError::MissingPort {
                input: input.to_owned(),
            })?;
        let invalid_host = || HostPortError::InvalidHost {
            input: input.to_owned(),
        };
        let host = match host.strip_prefix('[') {
            Some(rest) => rest
                .strip_suffix(']')
                .filter(|h| h.contains(':'))
                .ok_or_else(invalid_host)?,
            None if host.contains(':') || host.contains(']') => return Err(invalid_host()),
            None => host,
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(invalid_host());
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| HostPortError::InvalidPort {
                input: input.to_owned(),
            })?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl TryFrom<String> for HostPort {
    type Error = HostPortError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<HostPort> for String {
    fn from(value: HostPort) -> Self {
        value.to_string()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A secret string (a broker password) whose `Debug` output is redacted, so that logging a config at startup
/// cannot leak it. It serializes in clear because the agent persists its last-good config to disk.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    /// Accepts numbers as text too: `MESHBRIDGE_BROKER__PASSWORD=123456` arrives as an integer.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        super::load::lenient::string(deserializer).map(Self)
    }
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret in clear, for handing to the broker client; named so that every use is easy to find.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_size_parse_table() {
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("100", 100),
            ("100B", 100),
            ("100 b", 100),
            ("512KiB", 512 * 1024),
            ("512kib", 512 * 1024),
            ("64MiB", 64 << 20),
            ("64 MiB", 64 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("1KB", 1_000),
            ("1kB", 1_000),
            ("1MB", 1_000_000),
            ("1GB", 1_000_000_000),
            ("3TB", 3_000_000_000_000),
            ("1.5GiB", 3 << 29),
            ("0.5KiB", 512),
            ("1.0001KB", 1_000),
            ("  8MiB  ", 8 << 20),
            ("18446744073709551615", u64::MAX),
        ];
        for (input, expected) in ok {
            assert_eq!(
                input.parse::<ByteSize>(),
                Ok(ByteSize(*expected)),
                "input {input:?}"
            );
        }

        let err: &[(&str, ByteSizeError)] = &[
            ("", ByteSizeError::Empty),
            ("   ", ByteSizeError::Empty),
            (
                "MiB",
                ByteSizeError::InvalidNumber {
                    input: "MiB".into(),
                },
            ),
            ("-1", ByteSizeError::InvalidNumber { input: "-1".into() }),
            (
                ".5MiB",
                ByteSizeError::InvalidNumber {
                    input: ".5MiB".into(),
                },
            ),
            (
                "1.2.3MiB",
                ByteSizeError::InvalidNumber {
                    input: "1.2.3MiB".into(),
                },
            ),
            ("10k", ByteSizeError::UnknownUnit { unit: "k".into() }),
            (
                "10 megabytes",
                ByteSizeError::UnknownUnit {
                    unit: "megabytes".into(),
                },
            ),
            ("15EiB", ByteSizeError::UnknownUnit { unit: "EiB".into() }),
            (
                "18446744073709551616",
                ByteSizeError::Overflow {
                    input: "18446744073709551616".into(),
                },
            ),
            (
                "20000000TiB",
                ByteSizeError::Overflow {
                    input: "20000000TiB".into(),
                },
            ),
        ];
        for (input, expected) in err {
            assert_eq!(
                input.parse::<ByteSize>().as_ref(),
                Err(expected),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn byte_size_display_round_trips() {
        let cases: &[(u64, &str)] = &[
            (0, "0B"),
            (100, "100B"),
            (1024, "1KiB"),
            (1536, "1536B"),
            (1000, "1KB"),
            (64 << 20, "64MiB"),
            (1_000_000_000, "1GB"),
            (3 << 40, "3TiB"),
            (1_000_001, "1000001B"),
        ];
        for (bytes, text) in cases {
            let size = ByteSize(*bytes);
            assert_eq!(size.to_string(), *text);
            assert_eq!(text.parse::<ByteSize>(), Ok(size));
        }
    }

    #[test]
    fn host_port_parse_table() {
        let ok: &[(&str, &str, u16, &str)] = &[
            ("127.0.0.1:4433", "127.0.0.1", 4433, "127.0.0.1:4433"),
            (
                "hub.meshbridge.local:4433",
                "hub.meshbridge.local",
                4433,
                "hub.meshbridge.local:4433",
            ),
            ("[::1]:1883", "::1", 1883, "[::1]:1883"),
            ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ];
        for (input, host, port, display) in ok {
            let parsed: HostPort = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((parsed.host(), parsed.port()), (*host, *port));
            assert_eq!(parsed.to_string(), *display);
        }
        type MakeError = fn(String) -> HostPortError;
        let err: &[(&str, MakeError)] = &[
            ("localhost", |input| HostPortError::MissingPort { input }),
            (":4433", |input| HostPortError::InvalidHost { input }),
            ("::1:4433", |input| HostPortError::InvalidHost { input }),
            ("[127.0.0.1]:4433", |input| HostPortError::InvalidHost {
                input,
            }),
            ("a b:1", |input| HostPortError::InvalidHost { input }),
            ("host:0", |input| HostPortError::InvalidPort { input }),
            ("host:65536", |input| HostPortError::InvalidPort { input }),
            ("host:http", |input| HostPortError::InvalidPort { input }),
        ];
        for (input, make) in err {
            assert_eq!(
                input.parse::<HostPort>(),
                Err(make((*input).to_owned())),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn secret_debug_is_redacted() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(secret.expose(), "hunter2");
    }
}
