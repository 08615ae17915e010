//! MQTT topic names, topic filters, wildcard matching and per-site namespaces.
//!
//! Every topic that crosses the mesh is validated once, at the edge of the program (config load, an inbound
//! MQTT message, a decoded frame), into a [`TopicName`] or a [`TopicFilter`]. Past that point the rest of the
//! code can rely on the MQTT rules holding and never re-checks them, which is also what keeps
//! [`TopicFilter::matches`] a plain allocation-free walk over the levels.
//!
//! The rules (MQTT 3.1.1 §4.7 and 5.0 §4.7):
//! - a topic is UTF-8 (guaranteed by `&str`), at least one byte, at most [`MAX_TOPIC_LEN`] bytes, and contains
//!   no U+0000;
//! - a topic *name* contains no wildcard (`+` or `#`);
//! - in a topic *filter*, `+` fills a whole level and `#` fills a whole level and is the last one;
//! - empty levels are ordinary levels (`a//b` has three levels, `/a` starts with an empty one);
//! - a filter whose first level is a wildcard does not match names starting with `$` (`$SYS/...` is only
//!   reached by filters that spell out the `$` level).
//!
//! [`Namespace`] maps a site's local topics into its slice of the cloud broker (`acme/plant1/line1/...`) and
//! back, in a way that a site can never name a topic outside its own prefix.

mod namespace;
mod subscribed;
mod template;

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;

pub use namespace::{validate_site_name, Namespace, SITE_PLACEHOLDER};
pub use subscribed::SubscribedFilters;
pub use template::{Placeholder, TemplateError, TemplateVars, TopicTemplate};

/// Largest topic (name or filter) in bytes: MQTT carries topic lengths as a `u16`.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The single-level wildcard.
const SINGLE: char = '+';
/// The multi-level wildcard.
const MULTI: char = '#';

/// Why a string is not a valid topic name, topic filter, namespace or site name.
///
/// Offsets (`at`) are byte offsets into the string that was checked and levels are 0-based, so a caller can
/// point at the exact spot in a config file or log line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The string is empty; MQTT requires at least one byte in every topic.
    #[error("topic is empty")]
    Empty,
    /// The string is longer than MQTT's `u16` length prefix can carry (or, for a namespace, too long to leave
    /// room for any local topic under it).
    #[error("topic is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length of the offending string in bytes.
        len: usize,
        /// The limit that applied.
        max: usize,
    },
    /// The string contains U+0000, which MQTT forbids in every UTF-8 string.
    #[error("topic contains NUL at byte {at}")]
    ContainsNul {
        /// Byte offset of the first NUL.
        at: usize,
    },
    /// A topic name (or namespace) contains `+` or `#`; wildcards are only allowed in filters.
    #[error("topic name contains wildcard {wildcard:?} at byte {at}")]
    WildcardInName {
        /// Byte offset of the first wildcard.
        at: usize,
        /// The wildcard found (`+` or `#`).
        wildcard: char,
    },
    /// In a filter, a wildcard shares its level with other characters (`a/b+`, `a/#b`), or `#` is not the last
    /// level (`a/#/b`).
    #[error("wildcard {wildcard:?} misplaced in level {level} (byte {at}): it must fill its level, and '#' must be last")]
    MisplacedWildcard {
        /// 0-based level that holds the misplaced wildcard.
        level: usize,
        /// Byte offset of the wildcard.
        at: usize,
        /// The wildcard (`+` or `#`).
        wildcard: char,
    },
    /// A namespace starts with `$`, which would put a site's topics among the broker's own (`$SYS/...`) and
    /// hide them from ordinary `#` subscribers.
    #[error("namespace starts with '$'")]
    NamespaceStartsWithDollar,
    /// A namespace has an empty level (leading, trailing or doubled `/`). Prefixes are compared level by level,
    /// and an empty level would make `acme/` and `acme` two different-looking names for nearly the same place.
    #[error("namespace has an empty level {level}")]
    EmptyNamespaceLevel {
        /// 0-based index of the empty level.
        level: usize,
    },
    /// A site name cannot be substituted into a namespace template.
    #[error("invalid site name {site:?}: {problem}")]
    InvalidSiteName {
        /// The site name as given.
        site: String,
        /// What is wrong with it.
        problem: SiteNameProblem,
    },
    /// A namespace template contains a `{...}` placeholder other than `{site}`.
    #[error("unknown placeholder {{{name}}} in namespace template")]
    UnknownPlaceholder {
        /// The text between the braces.
        name: String,
    },
    /// A namespace template opens a placeholder with `{` and never closes it.
    #[error("unclosed '{{' at byte {at} in namespace template")]
    UnclosedPlaceholder {
        /// Byte offset of the `{`.
        at: usize,
    },
    /// A namespace template contains a `}` that closes nothing.
    #[error("unmatched '}}' at byte {at} in namespace template")]
    UnmatchedBrace {
        /// Byte offset of the `}`.
        at: usize,
    },
}

/// What is wrong with a site name (see [`TopicError::InvalidSiteName`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteNameProblem {
    /// The site name is empty, which would leave an empty namespace level.
    Empty,
    /// The site name contains a character that would change the namespace's structure once substituted: `/`
    /// (a new level), `+` or `#` (a wildcard), NUL, or `{`/`}` (template syntax).
    ForbiddenChar {
        /// The character.
        ch: char,
        /// Its byte offset in the site name.
        at: usize,
    },
}

impl fmt::Display for SiteNameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("it is empty"),
            Self::ForbiddenChar { ch, at } => write!(f, "forbidden character {ch:?} at byte {at}"),
        }
    }
}

/// Checks the rules shared by names and filters: non-empty, length, no NUL.
fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: MAX_TOPIC_LEN,
        });
    }
    if let Some(at) = s.find('\0') {
        return Err(TopicError::ContainsNul { at });
    }
    Ok(())
}

/// Checks that `s` is a valid MQTT topic name.
fn check_name(s: &str) -> Result<(), TopicError> {
    check_common(s)?;
    if let Some(at) = s.find([SINGLE, MULTI]) {
        let wildcard = if s.as_bytes()[at] == b'+' {
            SINGLE
        } else {
            MULTI
        };
        return Err(TopicError::WildcardInName { at, wildcard });
    }
    Ok(())
}

/// Checks that `s` is a valid MQTT topic filter.
fn check_filter(s: &str) -> Result<(), TopicError> {
    check_common(s)?;
    let mut start = 0;
    let mut levels = s.split('/').enumerate().peekable();
    while let Some((level, text)) = levels.next() {
        let is_last = levels.peek().is_none();
        if let Some(off) = text.find([SINGLE, MULTI]) {
            let wildcard = if text.as_bytes()[off] == b'+' {
                SINGLE
            } else {
                MULTI
            };
            let alone = text.len() == 1;
            if !alone || (wildcard == MULTI && !is_last) {
                return Err(TopicError::MisplacedWildcard {
                    level,
                    at: start + off,
                    wildcard,
                });
            }
        }
        start += text.len() + 1;
    }
    Ok(())
}

/// Implements the string conversions and serde shared by the two topic newtypes.
macro_rules! topic_string_impls {
    ($ty:ident, $check:path) => {
        impl $ty {
            /// Validates `s` and wraps it.
            ///
            /// # Errors
            /// The [`TopicError`] describing the first rule `s` breaks.
            pub fn parse(s: &str) -> Result<Self, TopicError> {
                $check(s)?;
                Ok(Self(s.to_owned()))
            }

            /// The topic as a string slice, exactly as it was given.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The topic's levels, in order (`"a//b"` gives `"a"`, `""`, `"b"`).
            pub fn levels(&self) -> std::str::Split<'_, char> {
                self.0.split('/')
            }

            /// Gives back the owned string.
            #[must_use]
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = TopicError;

            fn try_from(s: &str) -> Result<Self, TopicError> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = TopicError;

            /// Validates without copying the string.
            fn try_from(s: String) -> Result<Self, TopicError> {
                $check(&s)?;
                Ok(Self(s))
            }
        }

        impl FromStr for $ty {
            type Err = TopicError;

            fn from_str(s: &str) -> Result<Self, TopicError> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Hash, equality and ordering are those of the inner string, so maps keyed by the newtype can be
        /// looked up with a `&str`.
        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$ty> for String {
            fn from(t: $ty) -> Self {
                t.0
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    };
}

/// A valid MQTT topic name: what a message is published to.
///
/// Deserializes from a string and rejects invalid ones, so a config or frame holding a `TopicName` is valid
/// by construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct TopicName(String);

topic_string_impls!(TopicName, check_name);

/// A valid MQTT topic filter: what a subscription or a route selects, possibly with `+` and `#`.
///
/// Every topic name is also a valid filter (matching only itself), see [`From<TopicName>`](#impl-From<TopicName>-for-TopicFilter).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct TopicFilter(String);

topic_string_impls!(TopicFilter, check_filter);

impl From<TopicName> for TopicFilter {
    /// A name has no wildcards, so as a filter it matches exactly itself.
    fn from(name: TopicName) -> Self {
        Self(name.0)
    }
}

impl TopicFilter {
    /// Whether the filter contains `+` or `#`. A filter without wildcards matches one name only, which lets a
    /// router use a hash lookup for it instead of a scan.
    #[must_use]
    pub fn has_wildcards(&self) -> bool {
        self.0.contains([SINGLE, MULTI])
    }

    /// Whether `name` matches this filter under MQTT rules.
    ///
    /// `+` matches exactly one level (possibly empty), `#` matches its level and everything below it including
    /// the parent (`a/#` matches `a`), and a filter whose first level is a wildcard never matches a name
    /// starting with `$` (`#` does not match `$SYS/x`, `$SYS/#` does). Allocation-free: both sides are walked
    /// level by level with `split('/')`.
    #[must_use]
    pub fn matches(&self, name: &TopicName) -> bool {
        self.matches_str(name.as_str())
    }

    /// [`Self::matches`] for a topic that has not been parsed into a [`TopicName`], so hot paths (the agent's
    /// route selection, called for every PUBLISH) match without allocating. `topic` is assumed to be a valid
    /// topic name; a broker has already checked it.
    #[must_use]
    pub fn matches_str(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut f_levels = self.0.split('/');
        let mut n_levels = topic.split('/');
        loop {
            match (f_levels.next(), n_levels.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(n)) if f == n => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

/// An ordered set of filters, for "does this topic match any of the configured filters?" questions (an agent's
/// uplink selection, a hub's per-site allow list).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TopicFilters(Vec<TopicFilter>);

impl TopicFilters {
    /// An empty set, which matches nothing.
    #[must_use]
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds a filter at the end.
    pub fn push(&mut self, filter: TopicFilter) {
        self.0.push(filter);
    }

    /// Whether any filter in the set matches `name`.
    #[must_use]
    pub fn matches_any(&self, name: &TopicName) -> bool {
        self.0.iter().any(|f| f.matches(name))
    }

    /// The first filter that matches `name`, for callers that need to know which rule fired.
    #[must_use]
    pub fn first_match(&self, name: &TopicName) -> Option<&TopicFilter> {
        self.0.iter().find(|f| f.matches(name))
    }

    /// The filters, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, TopicFilter> {
        self.0.iter()
    }

    /// Number of filters.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set holds no filter.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<TopicFilter>> for TopicFilters {
    fn from(filters: Vec<TopicFilter>) -> Self {
        Self(filters)
    }
}

impl FromIterator<TopicFilter> for TopicFilters {
    fn from_iter<I: IntoIterator<Item = TopicFilter>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a TopicFilters {
    type Item = &'a TopicFilter;
    type IntoIter = std::slice::Iter<'a, TopicFilter>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests;
