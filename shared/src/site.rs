//! Site identity: the rules a site name must follow, in one place for the config model (which refuses a
//! hub site the PKI could never issue a certificate for), the PKI (which writes the name as a certificate's
//! CN and DNS SAN and into file names) and the hub (which takes the name from a client certificate).
//!
//! Rules: 1 to [`MAX_SITE_NAME_LEN`] bytes of `[A-Za-z0-9._-]`, no leading or trailing `.` and no `..`. That
//! is stricter than what a `{site}` namespace level needs (see [`crate::topic::validate_site_name`]), on
//! purpose: the same name must also be a DNS label sequence and a safe file name.

use std::fmt;
use std::str::FromStr;

/// Longest accepted site name, in bytes. Keeps the SAN `<site>.sites.meshbridge` inside one 63-byte DNS label
/// budget plus slack, and keeps topic prefixes and file names short.
pub const MAX_SITE_NAME_LEN: usize = 64;

/// DNS suffix of the SAN put in every site certificate (`<site>.sites.meshbridge`), so tools that look only at
/// SANs (not the CN) still see the site name.
pub const SITE_SAN_SUFFIX: &str = "sites.meshbridge";

/// Why a string is not a valid site name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteNameError {
    /// The name is empty.
    #[error("site name is empty")]
    Empty,
    /// The name is longer than [`MAX_SITE_NAME_LEN`] bytes.
    #[error("site name is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
        /// The limit, [`MAX_SITE_NAME_LEN`].
        max: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9._-]`; such names would need escaping in MQTT topics,
    /// file names and the certificate's DNS SAN.
    #[error("site name has forbidden character {ch:?} at byte {index}")]
    InvalidChar {
        /// The forbidden character.
        ch: char,
        /// Its byte offset.
        index: usize,
    },
    /// The name starts or ends with `.` or contains `..`: `<site>.sites.meshbridge` would then have an empty DNS
    /// label, and `.`/`..` are path components.
    #[error("site name has an empty dot-separated part")]
    EmptyLabel,
}

/// A validated site name: what the hub knows a connected agent as.
///
/// Rules: 1 to [`MAX_SITE_NAME_LEN`] bytes of `[A-Za-z0-9._-]`, no leading/trailing dot and no `..`.
/// Constructed only through [`SiteId::new`] (or `parse`), so holding one means the rules were checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(String);

impl SiteId {
    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, SiteNameError> {
        if name.is_empty() {
            return Err(SiteNameError::Empty);
        }
        if name.len() > MAX_SITE_NAME_LEN {
            return Err(SiteNameError::TooLong {
                len: name.len(),
                max: MAX_SITE_NAME_LEN,
            });
        }
        if let Some((index, ch)) = name
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(SiteNameError::InvalidChar { ch, index });
        }
        if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
            return Err(SiteNameError::EmptyLabel);
        }
        Ok(Self(name.to_owned()))
    }

    /// The site name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The DNS SAN put in this site's certificate: `<site>.sites.meshbridge`.
    pub fn san_dns_name(&self) -> String {
        format!("{}.{SITE_SAN_SUFFIX}", self.0)
    }
}

impl FromStr for SiteId {
    type Err = SiteNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SiteId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for SiteId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SiteId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_name_rules() {
        let long = "a".repeat(MAX_SITE_NAME_LEN + 1);
        let max = "a".repeat(MAX_SITE_NAME_LEN);
        let cases: &[(&str, Result<(), SiteNameError>)] = &[
            ("line1", Ok(())),
            ("plant-1.line_2", Ok(())),
            ("A", Ok(())),
            (&max, Ok(())),
            ("", Err(SiteNameError::Empty)),
            (
                &long,
                Err(SiteNameError::TooLong {
                    len: MAX_SITE_NAME_LEN + 1,
                    max: MAX_SITE_NAME_LEN,
                }),
            ),
            (
                "line 1",
                Err(SiteNameError::InvalidChar { ch: ' ', index: 4 }),
            ),
            ("a/b", Err(SiteNameError::InvalidChar { ch: '/', index: 1 })),
            ("a+b", Err(SiteNameError::InvalidChar { ch: '+', index: 1 })),
            (
                "lïne",
                Err(SiteNameError::InvalidChar { ch: 'ï', index: 1 }),
            ),
            ("#", Err(SiteNameError::InvalidChar { ch: '#', index: 0 })),
            (".", Err(SiteNameError::EmptyLabel)),
            ("..", Err(SiteNameError::EmptyLabel)),
            (".line", Err(SiteNameError::EmptyLabel)),
            ("line.", Err(SiteNameError::EmptyLabel)),
            ("a..b", Err(SiteNameError::EmptyLabel)),
        ];
        for (name, want) in cases {
            let got = SiteId::new(name).map(|id| assert_eq!(id.as_str(), *name));
            assert_eq!(&got, want, "site name {name:?}");
        }
    }
}
