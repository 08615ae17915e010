//! Per-site namespaces: the prefix a site's topics live under in the cloud broker.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::{check_name, SiteNameProblem, TopicError, TopicFilter, TopicName, MAX_TOPIC_LEN};

/// The one placeholder a namespace template may contain, replaced by the site name.
pub const SITE_PLACEHOLDER: &str = "site";

/// Longest namespace in bytes: it must leave room for `/` and a one-byte local topic.
const MAX_NAMESPACE_LEN: usize = MAX_TOPIC_LEN - 2;

/// A site's prefix in the cloud broker, such as `acme/plant1/line1`.
///
/// Valid by construction: a topic name (no wildcards, no NUL, not empty) that does not start with `$` and has
/// no empty level (so no leading, trailing or doubled `/`).
///
/// # Isolation
/// [`apply`](Self::apply) always produces `<prefix>/<local>`, with the prefix first and a `/` after it, whatever
/// the local topic is. A local topic starting with `$` (`$SYS/x`) becomes `<prefix>/$SYS/x`, and one starting
/// with `/` becomes `<prefix>//x`: both stay inside the prefix, so a site cannot publish into another site's
/// namespace or into the cloud broker's `$` topics. [`strip`](Self::strip) and [`contains`](Self::contains) compare
/// whole levels, so `acme/plant1/line1` does not contain `acme/plant1/line10/x`.
///
/// Two namespaces where one is a level-wise prefix of the other (`acme/plant1` and `acme/plant1/line1`) are
/// not isolated from each other; [`overlaps`](Self::overlaps) detects that so the hub can refuse such a pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Namespace(String);

/// Checks that `site` can be substituted into a namespace template without changing its structure.
///
/// # Errors
/// [`TopicError::InvalidSiteName`] if `site` is empty or contains `/`, `+`, `#`, NUL, `{` or `}`.
pub fn validate_site_name(site: &str) -> Result<(), TopicError> {
    let problem = if site.is_empty() {
        Some(SiteNameProblem::Empty)
    } else {
        site.char_indices()
            .find(|(_, ch)| matches!(ch, '/' | '+' | '#' | '\0' | '{' | '}'))
            .map(|(at, ch)| SiteNameProblem::ForbiddenChar { ch, at })
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(TopicError::InvalidSiteName {
            site: site.to_owned(),
            problem,
        }),
    }
}

/// Checks the namespace rules on an already expanded prefix.
fn check_namespace(s: &str) -> Result<(), TopicError> {
    check_name(s)?;
    if s.len() > MAX_NAMESPACE_LEN {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: MAX_NAMESPACE_LEN,
        });
    }
    if s.starts_with('$') {
        return Err(TopicError::NamespaceStartsWithDollar);
    }
    if let Some(level) = s.split('/').position(str::is_empty) {
        return Err(TopicError::EmptyNamespaceLevel { level });
    }
    Ok(())
}

impl Namespace {
    /// Validates an already expanded prefix (no placeholders).
    ///
    /// # Errors
    /// The name errors of [`TopicName::parse`], [`TopicError::TooLong`] if no local topic would fit under it,
    /// [`TopicError::NamespaceStartsWithDollar`] or [`TopicError::EmptyNamespaceLevel`].
    pub fn parse(prefix: &str) -> Result<Self, TopicError> {
        check_namespace(prefix)?;
        Ok(Self(prefix.to_owned()))
    }

    /// Expands `{site}` in `template` with `site` and validates the result, e.g. `acme/{site}` with
    /// `plant1` gives `acme/plant1`.
    ///
    /// The site name is checked first (see [`validate_site_name`]) so that it can only ever fill part of a
    /// level, never add levels or wildcards. `{site}` may appear any number of times, including not at all
    /// (a fixed namespace). Braces have no escape: a literal `{` or `}` cannot be part of a namespace.
    ///
    /// # Errors
    /// [`TopicError::InvalidSiteName`], [`TopicError::UnknownPlaceholder`], [`TopicError::UnclosedPlaceholder`],
    /// [`TopicError::UnmatchedBrace`], or any error of [`Namespace::parse`] on the expansion.
    pub fn from_template(template: &str, site: &str) -> Result<Self, TopicError> {
        validate_site_name(site)?;
        let mut out = String::with_capacity(template.len() + site.len());
        let mut rest = template;
        let mut offset = 0;
        while let Some(pos) = rest.find(['{', '}']) {
            let at = offset + pos;
            if rest.as_bytes()[pos] == b'}' {
                return Err(TopicError::UnmatchedBrace { at });
            }
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            let Some(close) = after.find('}') else {
                return Err(TopicError::UnclosedPlaceholder { at });
            };
            let name = &after[..close];
            if name != SITE_PLACEHOLDER {
                return Err(TopicError::UnknownPlaceholder {
                    name: name.to_owned(),
                });
            }
            out.push_str(site);
            let consumed = pos + 1 + close + 1;
            rest = &rest[consumed..];
            offset += consumed;
        }
        out.push_str(rest);
        check_namespace(&out)?;
        Ok(Self(out))
    }

    /// The prefix as a string, without a trailing `/`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The longest site-local topic (bytes) that still fits [`MAX_TOPIC_LEN`] once prefixed: the room the
    /// hub announces to the agent so it can refuse longer topics at PUBLISH time.
    #[must_use]
    pub fn local_topic_room(&self) -> usize {
        MAX_TOPIC_LEN.saturating_sub(self.0.len() + 1)
    }

    /// Maps a site-local topic into the namespace: `<prefix>/<local>`.
    ///
    /// # Errors
    /// [`TopicError::TooLong`] if the result exceeds [`MAX_TOPIC_LEN`] bytes.
    pub fn apply(&self, local: &TopicName) -> Result<TopicName, TopicError> {
        self.join(local.as_str()).map(TopicName)
    }

    /// Maps a site-local subscription filter into the namespace: `<prefix>/<filter>`.
    ///
    /// The result selects exactly the images of the names the local filter selects, with one exception: the
    /// `$` rule of MQTT no longer applies once the prefix comes first, so a local `#` (which skips `$SYS/x`)
    /// becomes `<prefix>/#`, which matches `<prefix>/$SYS/x`. A caller that needs the local semantics exactly
    /// can [`strip`](Self::strip) the delivered topic and check it against the local filter.
    ///
    /// # Errors
    /// [`TopicError::TooLong`] if the result exceeds [`MAX_TOPIC_LEN`] bytes.
    pub fn apply_filter(&self, local: &TopicFilter) -> Result<TopicFilter, TopicError> {
        self.join(local.as_str()).map(TopicFilter)
    }

    /// `<prefix>/<local>` with the length check; the parts are already valid, and joining two valid parts with
    /// `/` keeps every level as it was, so only the length can break.
    fn join(&self, local: &str) -> Result<String, TopicError> {
        let len = self.0.len() + 1 + local.len();
        if len > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong {
                len,
                max: MAX_TOPIC_LEN,
            });
        }
        let mut out = String::with_capacity(len);
        out.push_str(&self.0);
        out.push('/');
        out.push_str(local);
        Ok(out)
    }

    /// An MQTT 5 Response Topic that a site's message carries to the cloud, mapped like its topic: a cloud
    /// service that answers reaches the site's namespace, never a topic the site could not publish to
    /// itself (issue 11: a site could point the cloud's replies anywhere, and the replies missed the site).
    ///
    /// # Errors
    /// [`TopicError`] if `local` is not a topic name or the result is too long.
    pub fn apply_response_topic(&self, local: &str) -> Result<String, TopicError> {
        self.join(TopicName::parse(local)?.as_str())
    }

    /// A Response Topic that a cloud message carries to the site: its local part when it lies inside the
    /// namespace. `None` otherwise: the site's reply is mapped into its namespace on the way up, so a topic
    /// outside it could never be answered, and the site is not told about it.
    #[must_use]
    pub fn strip_response_topic(&self, global: &str) -> Option<String> {
        self.local_part(global)
            .filter(|local| TopicName::parse(local).is_ok())
            .map(str::to_owned)
    }

    /// The part of `global` below the prefix, or `None` unless `global` is strictly inside the namespace.
    ///
    /// "Inside" is level-wise: `global` must be the prefix, then `/`, then a non-empty rest. The prefix itself
    /// is not inside (no local topic maps to it) and `acme/plant1/line10/x` is not inside `acme/plant1/line1`.
    #[must_use]
    pub fn strip(&self, global: &TopicName) -> Option<TopicName> {
        self.local_part(global.as_str())
            .map(|local| TopicName(local.to_owned()))
    }

    /// Whether `global` is strictly inside the namespace; the same test as [`strip`](Self::strip) without
    /// building the local name.
    #[must_use]
    pub fn contains(&self, global: &TopicName) -> bool {
        self.local_part(global.as_str()).is_some()
    }

    /// Whether the two namespaces share any topic, which happens when one is a level-wise prefix of the other
    /// (or they are equal). Two sites whose namespaces overlap could read or spoof each other's topics.
    #[must_use]
    pub fn overlaps(&self, other: &Self) -> bool {
        let (short, long) = if self.0.len() <= other.0.len() {
            (&self.0, &other.0)
        } else {
            (&other.0, &self.0)
        };
        long.strip_prefix(short.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The non-empty rest after `<prefix>/`, if `global` starts with it.
    fn local_part<'g>(&self, global: &'g str) -> Option<&'g str> {
        global
            .strip_prefix(self.0.as_str())?
            .strip_prefix('/')
            .filter(|rest| !rest.is_empty())
    }
}

impl TryFrom<&str> for Namespace {
    type Error = TopicError;

    fn try_from(s: &str) -> Result<Self, TopicError> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Namespace {
    type Error = TopicError;

    fn try_from(s: String) -> Result<Self, TopicError> {
        check_namespace(&s)?;
        Ok(Self(s))
    }
}

impl std::str::FromStr for Namespace {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, TopicError> {
        Self::parse(s)
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Namespace {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Namespace {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn name(s: &str) -> TopicName {
        TopicName::parse(s).expect("test topic is valid")
    }

    fn ns(s: &str) -> Namespace {
        Namespace::parse(s).expect("test namespace is valid")
    }

    #[test]
    fn response_topics_stay_inside_the_site_namespace() {
        let line1 = ns("acme/plant1/line1");
        assert_eq!(
            line1.apply_response_topic("replies/robot5").as_deref(),
            Ok("acme/plant1/line1/replies/robot5")
        );
        assert!(
            line1.apply_response_topic("replies/+").is_err(),
            "a filter is no topic"
        );
        assert!(line1.apply_response_topic("").is_err());
        assert_eq!(
            line1
                .strip_response_topic("acme/plant1/line1/replies/robot5")
                .as_deref(),
            Some("replies/robot5")
        );
        for outside in [
            "acme/plant1/line2/replies",
            "acme/plant1/line10/x",
            "acme/plant1/line1",
            "cloud/x",
        ] {
            assert_eq!(line1.strip_response_topic(outside), None, "{outside}");
        }
    }

    #[test]
    fn parse_table() {
        let long = "a".repeat(MAX_NAMESPACE_LEN + 1);
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("acme", Ok(())),
            ("acme/plant1/line1", Ok(())),
            ("acme/$x", Ok(())),
            ("a b/c", Ok(())),
            ("", Err(TopicError::Empty)),
            ("$SYS", Err(TopicError::NamespaceStartsWithDollar)),
            ("/acme", Err(TopicError::EmptyNamespaceLevel { level: 0 })),
            ("acme/", Err(TopicError::EmptyNamespaceLevel { level: 1 })),
            ("a//b", Err(TopicError::EmptyNamespaceLevel { level: 1 })),
            (
                "acme/+",
                Err(TopicError::WildcardInName {
                    at: 5,
                    wildcard: '+',
                }),
            ),
            (
                "acme/#",
                Err(TopicError::WildcardInName {
                    at: 5,
                    wildcard: '#',
                }),
            ),
            ("a\0", Err(TopicError::ContainsNul { at: 1 })),
            (
                &long,
                Err(TopicError::TooLong {
                    len: MAX_NAMESPACE_LEN + 1,
                    max: MAX_NAMESPACE_LEN,
                }),
            ),
        ];
        for (input, want) in cases {
            let got = Namespace::parse(input).map(|n| assert_eq!(n.as_str(), *input));
            assert_eq!(&got, want, "namespace {input:?}");
        }
    }

    #[test]
    fn template_table() {
        let bad_site = |site: &str, problem| {
            Err(TopicError::InvalidSiteName {
                site: site.to_owned(),
                problem,
            })
        };
        let forbidden = |ch, at| SiteNameProblem::ForbiddenChar { ch, at };
        let cases: Vec<(&str, &str, Result<&str, TopicError>)> = vec![
            ("acme/{site}", "plant1", Ok("acme/plant1")),
            ("acme/{site}/line1", "p", Ok("acme/p/line1")),
            ("{site}", "x", Ok("x")),
            ("{site}-{site}", "x", Ok("x-x")),
            ("fixed/prefix", "x", Ok("fixed/prefix")),
            ("acme/site-{site}-v2", "é", Ok("acme/site-é-v2")),
            ("acme/{site}", "", bad_site("", SiteNameProblem::Empty)),
            ("acme/{site}", "a/b", bad_site("a/b", forbidden('/', 1))),
            ("acme/{site}", "+", bad_site("+", forbidden('+', 0))),
            ("acme/{site}", "x#", bad_site("x#", forbidden('#', 1))),
            ("acme/{site}", "x\0", bad_site("x\0", forbidden('\0', 1))),
            (
                "acme/{site}",
                "{site}",
                bad_site("{site}", forbidden('{', 0)),
            ),
            ("acme/{site}", "a}", bad_site("a}", forbidden('}', 1))),
            (
                "acme/{plant}",
                "x",
                Err(TopicError::UnknownPlaceholder {
                    name: "plant".into(),
                }),
            ),
            (
                "acme/{}",
                "x",
                Err(TopicError::UnknownPlaceholder { name: "".into() }),
            ),
            (
                "acme/{site",
                "x",
                Err(TopicError::UnclosedPlaceholder { at: 5 }),
            ),
            ("acme/site}", "x", Err(TopicError::UnmatchedBrace { at: 9 })),
            ("{site}/a}", "x", Err(TopicError::UnmatchedBrace { at: 8 })),
            ("{site}", "$SYS", Err(TopicError::NamespaceStartsWithDollar)),
            ("acme/{site}", "$x", Ok("acme/$x")),
            (
                "acme//{site}",
                "x",
                Err(TopicError::EmptyNamespaceLevel { level: 1 }),
            ),
            (
                "acme/{site}/",
                "x",
                Err(TopicError::EmptyNamespaceLevel { level: 2 }),
            ),
            (
                "acme/+/{site}",
                "x",
                Err(TopicError::WildcardInName {
                    at: 5,
                    wildcard: '+',
                }),
            ),
        ];
        for (template, site, want) in cases {
            let got = Namespace::from_template(template, site);
            let got = got.as_ref().map(Namespace::as_str).map_err(Clone::clone);
            assert_eq!(got, want, "template {template:?} site {site:?}");
        }
    }

    #[test]
    fn apply_strip_contains_table() {
        let line1 = ns("acme/plant1/line1");
        // (global, strip result)
        let cases: &[(&str, Option<&str>)] = &[
            ("acme/plant1/line1/x", Some("x")),
            ("acme/plant1/line1/a/b", Some("a/b")),
            ("acme/plant1/line1//a", Some("/a")),
            ("acme/plant1/line1/$SYS/x", Some("$SYS/x")),
            ("acme/plant1/line1/a/", Some("a/")),
            ("acme/plant1/line1", None),
            ("acme/plant1/line1/", None),
            ("acme/plant1/line10/x", None),
            ("acme/plant1/line10", None),
            ("acme/plant1", None),
            ("acme/plant1/line2/x", None),
            ("xacme/plant1/line1/x", None),
            ("/acme/plant1/line1/x", None),
        ];
        for (global, want) in cases {
            let global = name(global);
            let got = line1.strip(&global);
            assert_eq!(got.as_ref().map(TopicName::as_str), *want, "strip {global}");
            assert_eq!(line1.contains(&global), want.is_some(), "contains {global}");
        }
        assert_eq!(
            line1.apply(&name("$SYS/x")).map(String::from),
            Ok("acme/plant1/line1/$SYS/x".to_owned())
        );
        assert_eq!(
            line1.apply(&name("/x")).map(String::from),
            Ok("acme/plant1/line1//x".to_owned())
        );
    }

    #[test]
    fn apply_rejects_overlong_results() {
        let prefix = ns("p");
        assert_eq!(prefix.local_topic_room(), MAX_TOPIC_LEN - 2);
        let fits = name(&"a".repeat(MAX_TOPIC_LEN - 2));
        assert_eq!(
            prefix.apply(&fits).map(|t| t.as_str().len()),
            Ok(MAX_TOPIC_LEN)
        );
        let too_long = name(&"a".repeat(MAX_TOPIC_LEN - 1));
        assert_eq!(
            prefix.apply(&too_long),
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 1,
                max: MAX_TOPIC_LEN
            })
        );
        let filter = TopicFilter::parse(&format!("{}/#", "a".repeat(MAX_TOPIC_LEN - 2)))
            .expect("test filter is valid");
        assert_eq!(
            prefix.apply_filter(&filter),
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 2,
                max: MAX_TOPIC_LEN
            })
        );
    }

    #[test]
    fn apply_filter_table() {
        let line1 = ns("acme/plant1/line1");
        // (local filter, global topic, matches)
        let cases: &[(&str, &str, bool)] = &[
            ("#", "acme/plant1/line1/x", true),
            ("#", "acme/plant1/line1", true),
            ("#", "acme/plant1/line10/x", false),
            ("#", "acme/plant1/line1/$SYS/x", true),
            ("+/temp", "acme/plant1/line1/m1/temp", true),
            ("+/temp", "acme/plant1/line2/m1/temp", false),
            ("m1/temp", "acme/plant1/line1/m1/temp", true),
            ("$SYS/#", "acme/plant1/line1/$SYS/broker/load", true),
        ];
        for (local, global, want) in cases {
            let local = TopicFilter::parse(local).expect("test filter is valid");
            let mapped = line1.apply_filter(&local).expect("fits");
            assert_eq!(mapped.matches(&name(global)), *want, "{mapped} vs {global}");
        }
    }

    #[test]
    fn overlaps_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("acme/plant1", "acme/plant1/line1", true),
            ("acme/plant1/line1", "acme/plant1/line1", true),
            ("acme/plant1/line1", "acme/plant1/line10", false),
            ("acme/plant1/line1", "acme/plant1/line2", false),
            ("acme", "acmex", false),
            ("a", "b", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(ns(a).overlaps(&ns(b)), *want, "{a} vs {b}");
            assert_eq!(ns(b).overlaps(&ns(a)), *want, "{b} vs {a} (symmetry)");
        }
    }

    #[test]
    fn serde_validates() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Site {
            namespace: Namespace,
        }
        let ok: Site = toml::from_str("namespace = \"acme/p1\"").expect("valid namespace");
        assert_eq!(ok.namespace.as_str(), "acme/p1");
        assert_eq!(
            toml::to_string(&ok).expect("serializes"),
            "namespace = \"acme/p1\"\n"
        );
        let err = toml::from_str::<Site>("namespace = \"acme/\"").expect_err("empty level");
        assert!(err.to_string().contains("empty level"), "{err}");
    }

    /// Local topic names: a mix of ordinary, empty, `$`-prefixed and non-ASCII levels.
    fn local_name() -> impl Strategy<Value = TopicName> {
        prop::collection::vec("[a-z0-9$ é]{0,4}", 1..6)
            .prop_filter_map("topic must be non-empty", |levels| {
                TopicName::parse(&levels.join("/")).ok()
            })
    }

    proptest! {
        #[test]
        fn strip_inverts_apply(local in local_name(), site in "[a-z0-9]{1,3}") {
            let space = Namespace::from_template("acme/{site}/line", &site).expect("valid site");
            let global = space.apply(&local).expect("short topics fit");
            prop_assert!(space.contains(&global));
            prop_assert_eq!(space.strip(&global), Some(local));
        }

        #[test]
        fn sites_are_isolated(
            local in local_name(),
            a in "line[0-9]{1,3}",
            b in "line[0-9]{1,3}",
        ) {
            prop_assume!(a != b);
            let ns_a = Namespace::from_template("acme/plant1/{site}", &a).expect("valid site");
            let ns_b = Namespace::from_template("acme/plant1/{site}", &b).expect("valid site");
            let global = ns_a.apply(&local).expect("short topics fit");
            prop_assert!(!ns_b.contains(&global));
            prop_assert_eq!(ns_b.strip(&global), None);
            prop_assert!(!ns_a.overlaps(&ns_b));
        }

        #[test]
        fn applied_filters_match_applied_names(
            local in local_name(),
            cut in 0usize..6,
            plus_at in 0usize..6,
        ) {
            // A filter built from the name (one level replaced by `+`, or a `#` suffix) matches the name, and
            // so must its image match the name's image: subscriptions follow their topics into the namespace.
            let levels: Vec<&str> = local.levels().collect();
            let mut filter_levels: Vec<&str> = levels.clone();
            if plus_at < filter_levels.len() {
                filter_levels[plus_at] = "+";
            }
            if cut < filter_levels.len() {
                filter_levels.truncate(cut);
                filter_levels.push("#");
            }
            let filter = TopicFilter::parse(&filter_levels.join("/")).expect("built filter is valid");
            let space = Namespace::parse("acme/plant1/line1").expect("valid namespace");
            let global = space.apply(&local).expect("fits");
            prop_assert!(space.apply_filter(&filter).expect("fits").matches(&global));
        }
    }
}
