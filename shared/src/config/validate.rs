//! The problems `validate()` reports, and the small checks shared by the agent and hub trees.
//!
//! Validation collects every problem instead of stopping at the first (as vector's config compiler does),
//! because an operator fixing a file should see the whole list in one run. Each problem carries the key path
//! it belongs to (`sites[1].namespace`), written the way the operator would find it in the TOML file.
//!
//! Topic filters and namespace templates are checked here with a minimal, self-contained grammar.
//! `shared::topic` owns the real MQTT topic types; once it exists, [`check_topic_filter`] and
//! [`check_namespace_template`] should delegate to its parsers so that the two never disagree.

use std::fmt;
use std::time::Duration;

use super::units::ByteSize;
use crate::site::{SiteId, SiteNameError};
use crate::topic::{Namespace, SiteNameProblem, TopicError, TopicFilter};

/// One problem found by `validate()`: the key it concerns and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct FieldError {
    /// Dotted key path as written in the file, with array indices: `uplink.window`, `routes[2].filter`.
    pub key: String,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with one config value. Values are kept typed so callers (and tests) can match on them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// An integer is outside its allowed inclusive range.
    #[error("must be between {min} and {max}, got {value}")]
    IntOutOfRange {
        /// The configured value.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// A byte size is outside its allowed inclusive range.
    #[error("must be between {min} and {max}, got {value}")]
    SizeOutOfRange {
        /// The configured value.
        value: ByteSize,
        /// Smallest allowed value.
        min: ByteSize,
        /// Largest allowed value.
        max: ByteSize,
    },
    /// A duration is outside its allowed inclusive range.
    #[error("must be between {} and {}, got {}", Human(*min), Human(*max), Human(*value))]
    DurationOutOfRange {
        /// The configured value.
        value: Duration,
        /// Smallest allowed value.
        min: Duration,
        /// Largest allowed value.
        max: Duration,
    },
    /// A duration that is used as a timer period or deadline is zero.
    #[error("must be greater than zero")]
    ZeroDuration,
    /// A duration must exceed another one (`idle_timeout` must outlast `keep_alive`, or every idle link dies).
    #[error("must be greater than {other} ({}), got {}", Human(*other_value), Human(*value))]
    NotLongerThan {
        /// The configured value.
        value: Duration,
        /// Key path of the value it must exceed.
        other: String,
        /// That other value.
        other_value: Duration,
    },
    /// A lower bound exceeds its upper bound (`reconnect_min` > `reconnect_max`).
    #[error("must not exceed {other} ({}), got {}", Human(*other_value), Human(*value))]
    ExceedsMaximum {
        /// The configured value.
        value: Duration,
        /// Key path of the upper bound.
        other: String,
        /// That upper bound.
        other_value: Duration,
    },
    /// An integer must be below another setting.
    #[error("must be below {other} ({other_value}), got {value}")]
    NotBelow {
        /// The configured value.
        value: u64,
        /// Key path of the setting it must stay below.
        other: String,
        /// That setting's value.
        other_value: u64,
    },
    /// A size limit is too small to hold what it must carry (a frame must hold a whole batch plus overhead).
    #[error("must be at least {needed} ({reason}), got {value}")]
    SizeTooSmall {
        /// The configured value.
        value: ByteSize,
        /// The smallest value that works with the rest of the config.
        needed: ByteSize,
        /// What `needed` is made of, naming the other keys.
        reason: String,
    },
    /// A value that must be non-empty is empty (a string, or a list such as `routes`).
    #[error("must not be empty")]
    Empty,
    /// One of two settings that only make sense together is set without the other.
    #[error("is set but `{missing}` is not: set both or neither")]
    MissingCompanion {
        /// Key path of the missing setting.
        missing: String,
    },
    /// Two settings that cannot be used together.
    #[error("cannot be set together with {other}: {why}")]
    Conflicts {
        /// Key path of the other setting.
        other: String,
        /// Why not.
        why: &'static str,
    },
    /// The hub's embedded cloud broker would take anyone without saying so.
    #[error("the cloud broker requires authentication: set broker.password_file, or broker.allow_anonymous = true to let in anyone who can reach broker.listen")]
    Unauthenticated,
    /// A value must be unique within a list and is not.
    #[error("duplicate of {first}")]
    Duplicate {
        /// Key path of the first occurrence.
        first: String,
    },
    /// Two site namespaces overlap level-wise: messages of one site would land inside the other's tree.
    #[error("`{namespace}` overlaps {other} (`{other_namespace}`)")]
    NamespaceOverlap {
        /// This site's expanded namespace.
        namespace: String,
        /// Key path of the other site's namespace.
        other: String,
        /// The other site's expanded namespace.
        other_namespace: String,
    },
    /// A site name cannot be used as one topic level.
    #[error("invalid site name `{name}`: {reason}")]
    InvalidSiteName {
        /// The configured name.
        name: String,
        /// Why it is refused.
        reason: TopicTextError,
    },
    /// A string contains a NUL character, which MQTT forbids in client ids, topics and credentials.
    #[error("must not contain a NUL character")]
    ContainsNul,
    /// A route's topic filter is not a valid MQTT topic filter.
    #[error("invalid topic filter `{filter}`: {reason}")]
    InvalidTopicFilter {
        /// The configured filter.
        filter: String,
        /// Why it is refused.
        reason: TopicTextError,
    },
    /// A site's namespace template is not valid.
    #[error("invalid namespace template `{template}`: {reason}")]
    InvalidNamespace {
        /// The configured template.
        template: String,
        /// Why it is refused.
        reason: TopicTextError,
    },
    /// A route names a site that is not in `sites`.
    #[error("no site named `{name}` in `sites` (write \"*\" alone for every site)")]
    UnknownSite {
        /// The name as written.
        name: String,
    },
    /// A setting this kind of entry needs is missing (`from` on an uplink route).
    #[error("must be set {context}")]
    Required {
        /// Which entries need it, e.g. `for uplink routes`.
        context: String,
    },
    /// A setting is present where it has no meaning (`to` on an uplink route, whose destination is the
    /// cloud); refused rather than ignored, since the operator clearly expected it to do something.
    #[error("is not used {context}; remove it")]
    NotUsed {
        /// Where it is meaningless, e.g. `by uplink routes`.
        context: String,
    },
    /// A route name breaks the naming rules (those of site names, so it is safe in logs, metrics and files).
    #[error("invalid route name `{name}`: {reason}")]
    InvalidRouteName {
        /// The configured name.
        name: String,
        /// Why it is refused.
        reason: SiteNameError,
    },
    /// An agent's `agent_name` is not usable as part of an origin (`<site>/<agent_name>`): it follows the
    /// rules of a site name.
    #[error("invalid agent name `{name}`: {reason}")]
    InvalidAgentName {
        /// The configured name.
        name: String,
        /// Why it is refused.
        reason: SiteNameError,
    },
    /// A route's topic template is not valid.
    #[error("invalid topic template `{template}`: {reason}")]
    InvalidTemplate {
        /// The configured template.
        template: String,
        /// Why it is refused.
        reason: crate::topic::TemplateError,
    },
    /// An uplink template does not keep the topic inside the site's namespace.
    #[error("uplink topic `{template}` must start with `{{namespace}}/`, so a site only publishes into its own namespace")]
    TemplateOutsideNamespace {
        /// The configured template.
        template: String,
    },
    /// A route would deliver into `$` topics, which are reserved for brokers.
    #[error("filter `{filter}` with a topic template starting with `{{topic}}` would deliver into `$` topics")]
    ReservedTopic {
        /// The configured filter.
        filter: String,
    },
}

/// Why a topic filter, namespace template or site name was refused by the minimal checks here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicTextError {
    /// The text is empty.
    #[error("it is empty")]
    Empty,
    /// The text is longer than MQTT's 65535-byte string limit.
    #[error("it is {len} bytes long, more than MQTT's 65535")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The text contains a NUL character.
    #[error("it contains a NUL character")]
    ContainsNul,
    /// `#` appears other than alone in the last level.
    #[error("`#` must be alone in the last level")]
    MisplacedMultiLevelWildcard,
    /// `+` shares its level with other characters.
    #[error("`+` must be alone in its level")]
    MisplacedSingleLevelWildcard,
    /// A namespace or site name contains `+` or `#`; they are filters, not topics.
    #[error("it contains a wildcard (`+` or `#`)")]
    Wildcard,
    /// A namespace has an empty level (leading, trailing or doubled `/`).
    #[error("it has an empty level (leading, trailing or doubled `/`)")]
    EmptyLevel,
    /// A namespace starts with `$`, which MQTT reserves for broker topics such as `$SYS`.
    #[error("it starts with `$`, which is reserved for broker topics")]
    Reserved,
    /// A site name contains `/`, so it would span several levels.
    #[error("it contains `/`")]
    Slash,
    /// A site name breaks the site identity rules (see [`crate::site`]).
    #[error("{0}")]
    SiteName(#[source] SiteNameError),
    /// A template contains a `{placeholder}` other than `{site}`.
    #[error("unknown placeholder `{{{name}}}`: only `{{site}}` is supported")]
    UnknownPlaceholder {
        /// The name between the braces.
        name: String,
    },
    /// A template has a `{` without a matching `}` or a stray `}`.
    #[error("unbalanced `{{` or `}}`")]
    UnbalancedBrace,
}

/// Formats a duration the way it is written in config files (`1m 30s`), for messages.
#[derive(Debug, Clone, Copy)]
struct Human(Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&humantime_serde::re::humantime::format_duration(self.0), f)
    }
}

/// Accumulates problems while walking a config tree.
#[derive(Debug, Default)]
pub(crate) struct Report {
    errors: Vec<FieldError>,
}

impl Report {
    pub(crate) fn push(&mut self, key: impl Into<String>, problem: Problem) {
        self.errors.push(FieldError {
            key: key.into(),
            problem,
        });
    }

    pub(crate) fn int_range(&mut self, key: &str, value: u64, min: u64, max: u64) {
        if !(min..=max).contains(&value) {
            self.push(key, Problem::IntOutOfRange { value, min, max });
        }
    }

    pub(crate) fn size_range(&mut self, key: &str, value: ByteSize, min: ByteSize, max: ByteSize) {
        if !(min..=max).contains(&value) {
            self.push(key, Problem::SizeOutOfRange { value, min, max });
        }
    }

    /// Range check for durations; zero gets its own clearer message when it is out of range.
    pub(crate) fn duration_range(
        &mut self,
        key: &str,
        value: Duration,
        min: Duration,
        max: Duration,
    ) {
        if value.is_zero() && !min.is_zero() {
            self.push(key, Problem::ZeroDuration);
        } else if !(min..=max).contains(&value) {
            self.push(key, Problem::DurationOutOfRange { value, min, max });
        }
    }

    pub(crate) fn nonzero(&mut self, key: &str, value: Duration) {
        if value.is_zero() {
            self.push(key, Problem::ZeroDuration);
        }
    }

    /// Checks a free-form string that must be non-empty and NUL-free (client ids, usernames, log directives).
    pub(crate) fn text(&mut self, key: &str, value: &str) {
        if value.is_empty() {
            self.push(key, Problem::Empty);
        } else if value.contains('\0') {
            self.push(key, Problem::ContainsNul);
        }
    }

    /// Checks that a path setting is not empty.
    pub(crate) fn path(&mut self, key: &str, value: &std::path::Path) {
        if value.as_os_str().is_empty() {
            self.push(key, Problem::Empty);
        }
    }

    /// Reports a value set without its companion (`username` without `password`), in either direction.
    pub(crate) fn pair(
        &mut self,
        prefix: &str,
        (a, a_set): (&str, bool),
        (b, b_set): (&str, bool),
    ) {
        match (a_set, b_set) {
            (true, false) => self.push(
                format!("{prefix}{a}"),
                Problem::MissingCompanion {
                    missing: format!("{prefix}{b}"),
                },
            ),
            (false, true) => self.push(
                format!("{prefix}{b}"),
                Problem::MissingCompanion {
                    missing: format!("{prefix}{a}"),
                },
            ),
            _ => {}
        }
    }

    /// Number of problems so far.
    pub(crate) fn len(&self) -> usize {
        self.errors.len()
    }

    pub(crate) fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

impl From<TopicError> for TopicTextError {
    fn from(e: TopicError) -> Self {
        match e {
            TopicError::Empty => Self::Empty,
            TopicError::TooLong { len, .. } => Self::TooLong { len },
            TopicError::ContainsNul { .. } => Self::ContainsNul,
            TopicError::WildcardInName { .. } => Self::Wildcard,
            TopicError::MisplacedWildcard { wildcard: '#', .. } => {
                Self::MisplacedMultiLevelWildcard
            }
            TopicError::MisplacedWildcard { .. } => Self::MisplacedSingleLevelWildcard,
            TopicError::NamespaceStartsWithDollar => Self::Reserved,
            TopicError::EmptyNamespaceLevel { .. } => Self::EmptyLevel,
            TopicError::InvalidSiteName { problem, .. } => match problem {
                SiteNameProblem::Empty => Self::Empty,
                SiteNameProblem::ForbiddenChar { ch: '/', .. } => Self::Slash,
                SiteNameProblem::ForbiddenChar { ch: '\0', .. } => Self::ContainsNul,
                SiteNameProblem::ForbiddenChar { ch: '{' | '}', .. } => Self::UnbalancedBrace,
                SiteNameProblem::ForbiddenChar { .. } => Self::Wildcard,
            },
            TopicError::UnknownPlaceholder { name } => Self::UnknownPlaceholder { name },
            TopicError::UnclosedPlaceholder { .. } | TopicError::UnmatchedBrace { .. } => {
                Self::UnbalancedBrace
            }
        }
    }
}

/// Checks an MQTT topic filter by [`TopicFilter`]'s rules: non-empty, at most 65535 bytes, no NUL, `#` only
/// alone in the last level and `+` only alone in its level.
pub fn check_topic_filter(filter: &str) -> Result<(), TopicTextError> {
    TopicFilter::parse(filter).map(drop).map_err(Into::into)
}

/// Checks a site name by the rules of [`crate::site::SiteId`]: the hub takes the name from a certificate the
/// PKI issued, so a name the PKI refuses could never connect. Those rules also make it exactly one topic
/// level when `{site}` is expanded.
pub fn check_site_name(name: &str) -> Result<(), TopicTextError> {
    SiteId::new(name)
        .map(drop)
        .map_err(TopicTextError::SiteName)
}

/// The one placeholder a namespace template may contain.
pub const SITE_PLACEHOLDER: &str = "{site}";

/// Expands a namespace template (`acme/plant1/{site}`) for one site with [`Namespace::from_template`]: every
/// `{site}` is replaced by `site`, any other placeholder or an unbalanced brace is an error, and the result must
/// be a namespace (non-empty levels, no wildcards, no leading `$`).
pub fn expand_namespace(template: &str, site: &str) -> Result<String, TopicTextError> {
    Ok(Namespace::from_template(template, site)?
        .as_str()
        .to_owned())
}

/// Checks a namespace template independently of any site name, by expanding it with a neutral level.
pub fn check_namespace_template(template: &str) -> Result<(), TopicTextError> {
    expand_namespace(template, "site").map(drop)
}

/// True if `a` equals `b` or is a whole-level prefix of it (`acme/p1` vs `acme/p1/line1`, but not `acme/p10`).
pub(crate) fn level_prefix(a: &str, b: &str) -> bool {
    b.strip_prefix(a)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filter_table() {
        let table: &[(&str, Result<(), TopicTextError>)] = &[
            ("telemetry/#", Ok(())),
            ("#", Ok(())),
            ("+", Ok(())),
            ("a/+/c", Ok(())),
            ("+/+/#", Ok(())),
            ("a//b", Ok(())),
            ("/a", Ok(())),
            ("$SYS/#", Ok(())),
            ("", Err(TopicTextError::Empty)),
            ("a/#/b", Err(TopicTextError::MisplacedMultiLevelWildcard)),
            ("a/b#", Err(TopicTextError::MisplacedMultiLevelWildcard)),
            ("a/##", Err(TopicTextError::MisplacedMultiLevelWildcard)),
            ("a/b+/c", Err(TopicTextError::MisplacedSingleLevelWildcard)),
            ("++", Err(TopicTextError::MisplacedSingleLevelWildcard)),
            ("a/\0", Err(TopicTextError::ContainsNul)),
        ];
        for (filter, expected) in table {
            assert_eq!(&check_topic_filter(filter), expected, "filter {filter:?}");
        }
        let long = "a".repeat(65_536);
        assert_eq!(
            check_topic_filter(&long),
            Err(TopicTextError::TooLong { len: 65_536 })
        );
    }

    #[test]
    fn namespace_template_table() {
        let table: &[(&str, Result<&str, TopicTextError>)] = &[
            ("acme/plant1/{site}", Ok("acme/plant1/line1")),
            ("{site}", Ok("line1")),
            ("acme/{site}/data/{site}", Ok("acme/line1/data/line1")),
            ("acme/fixed", Ok("acme/fixed")),
            ("acme/x{site}y", Ok("acme/xline1y")),
            ("", Err(TopicTextError::Empty)),
            ("/acme/{site}", Err(TopicTextError::EmptyLevel)),
            ("acme/{site}/", Err(TopicTextError::EmptyLevel)),
            ("acme//{site}", Err(TopicTextError::EmptyLevel)),
            ("acme/+/{site}", Err(TopicTextError::Wildcard)),
            ("acme/{site}/#", Err(TopicTextError::Wildcard)),
            ("$SYS/{site}", Err(TopicTextError::Reserved)),
            (
                "acme/{plant}/{site}",
                Err(TopicTextError::UnknownPlaceholder {
                    name: "plant".into(),
                }),
            ),
            (
                "acme/{}",
                Err(TopicTextError::UnknownPlaceholder {
                    name: String::new(),
                }),
            ),
            ("acme/{site", Err(TopicTextError::UnbalancedBrace)),
            ("acme/site}", Err(TopicTextError::UnbalancedBrace)),
            (
                "acme/{{site}}",
                Err(TopicTextError::UnknownPlaceholder {
                    name: "{site".to_owned(),
                }),
            ),
            ("acme/\0/{site}", Err(TopicTextError::ContainsNul)),
        ];
        for (template, expected) in table {
            let got = expand_namespace(template, "line1");
            assert_eq!(
                got.as_deref().map_err(Clone::clone),
                *expected,
                "template {template:?}"
            );
        }
    }

    #[test]
    fn site_name_table() {
        let table: &[(&str, Result<(), TopicTextError>)] = &[
            ("line1", Ok(())),
            ("plant-1.line_2", Ok(())),
            ("", Err(TopicTextError::SiteName(SiteNameError::Empty))),
            (
                "a/b",
                Err(TopicTextError::SiteName(SiteNameError::InvalidChar {
                    ch: '/',
                    index: 1,
                })),
            ),
            (
                "line 1",
                Err(TopicTextError::SiteName(SiteNameError::InvalidChar {
                    ch: ' ',
                    index: 4,
                })),
            ),
            (
                "a..b",
                Err(TopicTextError::SiteName(SiteNameError::EmptyLabel)),
            ),
        ];
        for (name, expected) in table {
            assert_eq!(&check_site_name(name), expected, "name {name:?}");
        }
    }

    #[test]
    fn level_prefix_table() {
        let table = [
            ("acme/p1", "acme/p1/line1", true),
            ("acme/p1", "acme/p1", true),
            ("acme/p1", "acme/p10", false),
            ("acme/p1/line1", "acme/p1", false),
            ("acme", "other", false),
        ];
        for (a, b, expected) in table {
            assert_eq!(level_prefix(a, b), expected, "{a} vs {b}");
        }
    }

    #[test]
    fn problems_display_with_key() {
        let table = [
            (
                FieldError {
                    key: "uplink.batch_max_messages".into(),
                    problem: Problem::IntOutOfRange {
                        value: 0,
                        min: 1,
                        max: 65_536,
                    },
                },
                "uplink.batch_max_messages: must be between 1 and 65536, got 0",
            ),
            (
                FieldError {
                    key: "sites[1].namespace".into(),
                    problem: Problem::Duplicate {
                        first: "sites[0].namespace".into(),
                    },
                },
                "sites[1].namespace: duplicate of sites[0].namespace",
            ),
            (
                FieldError {
                    key: "uplink.reconnect_min".into(),
                    problem: Problem::ExceedsMaximum {
                        value: Duration::from_secs(90),
                        other: "uplink.reconnect_max".into(),
                        other_value: Duration::from_millis(1500),
                    },
                },
                "uplink.reconnect_min: must not exceed uplink.reconnect_max (1s 500ms), got 1m 30s",
            ),
        ];
        for (error, text) in table {
            assert_eq!(error.to_string(), text);
        }
    }
}
