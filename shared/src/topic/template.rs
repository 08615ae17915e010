//! Topic templates: how a route names the topic a message is delivered to (`{namespace}/{topic}`,
//! `from/{site}/{topic}`).
//!
//! A template is literal text with placeholders in braces. Placeholders are expanded with values that are
//! already valid (a [`TopicName`], a [`Namespace`], a site name), and literal text may not contain wildcards
//! or NUL, so an expansion can only fail on length or by starting with `$`; both are checked on every
//! expansion, so no template can ever produce an invalid topic or a `$` topic.

use std::fmt;

use thiserror::Error;

use super::{check_name, TopicError, TopicName};

/// A placeholder a template may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{topic}`: the message's topic as matched by the route's filter (site-local for uplink and
    /// site-to-site routes, the part below the site's namespace for downlink routes).
    Topic,
    /// `{site}`: the site the message was captured at (uplink, site-to-site) or is delivered to (downlink).
    Site,
    /// `{namespace}`: the origin site's namespace; uplink routes only.
    Namespace,
}

impl Placeholder {
    /// The placeholder as written, with braces.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "{topic}",
            Self::Site => "{site}",
            Self::Namespace => "{namespace}",
        }
    }
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TemplateError {
    /// The template is empty.
    #[error("it is empty")]
    Empty,
    /// A `{...}` names an unknown placeholder.
    #[error("unknown placeholder `{{{name}}}`: expected {{topic}}, {{site}} or {{namespace}}")]
    UnknownPlaceholder {
        /// The text between the braces.
        name: String,
    },
    /// A placeholder is known but not available for this kind of route.
    #[error("placeholder `{}` is not available here", .placeholder.as_str())]
    UnavailablePlaceholder {
        /// The placeholder.
        placeholder: Placeholder,
    },
    /// A `{` is never closed, or a `}` closes nothing.
    #[error("unbalanced `{{` or `}}` at byte {at}")]
    UnbalancedBrace {
        /// Byte offset of the offending brace.
        at: usize,
    },
    /// Literal text contains `+` or `#`: a template produces topic names, which have no wildcards.
    #[error("it contains the wildcard {wildcard:?} at byte {at}")]
    Wildcard {
        /// Byte offset.
        at: usize,
        /// `+` or `#`.
        wildcard: char,
    },
    /// Literal text contains NUL.
    #[error("it contains a NUL character")]
    ContainsNul,
    /// The template starts with `$`, so it would deliver into the broker's reserved `$` topics.
    #[error("it starts with `$`, which is reserved for broker topics")]
    Reserved,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(Placeholder),
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    parts: Vec<Part>,
}

/// The values a template is expanded with. `namespace` is only needed by templates that use `{namespace}`.
#[derive(Debug, Clone, Copy)]
pub struct TemplateVars<'a> {
    /// Value of `{topic}`.
    pub topic: &'a str,
    /// Value of `{site}`.
    pub site: &'a str,
    /// Value of `{namespace}`.
    pub namespace: &'a str,
}

impl TopicTemplate {
    /// Parses `text`, allowing only the placeholders in `allowed`.
    ///
    /// # Errors
    /// The first [`TemplateError`] found.
    pub fn parse(text: &str, allowed: &[Placeholder]) -> Result<Self, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        if text.starts_with('$') {
            return Err(TemplateError::Reserved);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(pos) = rest.find(['{', '}', '+', '#', '\0']) {
            let at = offset + pos;
            literal.push_str(&rest[..pos]);
            match rest.as_bytes()[pos] {
                b'}' => return Err(TemplateError::UnbalancedBrace { at }),
                b'\0' => return Err(TemplateError::ContainsNul),
                b'+' => return Err(TemplateError::Wildcard { at, wildcard: '+' }),
                b'#' => return Err(TemplateError::Wildcard { at, wildcard: '#' }),
                _ => {}
            }
            let after = &rest[pos + 1..];
            let close = after
                .find(['}', '{'])
                .filter(|&c| after.as_bytes()[c] == b'}')
                .ok_or(TemplateError::UnbalancedBrace { at })?;
            let name = &after[..close];
            let placeholder = match name {
                "topic" => Placeholder::Topic,
                "site" => Placeholder::Site,
                "namespace" => Placeholder::Namespace,
                other => {
                    return Err(TemplateError::UnknownPlaceholder {
                        name: other.to_owned(),
                    })
                }
            };
            if !allowed.contains(&placeholder) {
                return Err(TemplateError::UnavailablePlaceholder { placeholder });
            }
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Var(placeholder));
            let consumed = pos + 1 + close + 1;
            rest = &rest[consumed..];
            offset += consumed;
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            text: text.to_owned(),
            parts,
        })
    }

    /// The template as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the template is `{namespace}/` followed by at least one more part: every expansion then lies
    /// strictly inside the namespace.
    #[must_use]
    pub fn is_inside_namespace(&self) -> bool {
        match self.parts.as_slice() {
            [Part::Var(Placeholder::Namespace), Part::Literal(lit), rest @ ..] => {
                lit.starts_with('/') && (lit.len() > 1 || !rest.is_empty())
            }
            _ => false,
        }
    }

    /// Whether the expansion starts with `{topic}` (so the topic's own first level becomes the first level).
    #[must_use]
    pub fn starts_with_topic(&self) -> bool {
        matches!(self.parts.first(), Some(Part::Var(Placeholder::Topic)))
    }

    /// Whether the template uses `placeholder`.
    #[must_use]
    pub fn uses(&self, placeholder: Placeholder) -> bool {
        self.parts.contains(&Part::Var(placeholder))
    }

    /// The template with every placeholder replaced, as raw text (no checks); for building filters.
    #[must_use]
    pub fn substitute(&self, vars: TemplateVars<'_>) -> String {
        let mut out = String::with_capacity(self.text.len() + vars.topic.len());
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(lit) => lit,
                Part::Var(Placeholder::Topic) => vars.topic,
                Part::Var(Placeholder::Site) => vars.site,
                Part::Var(Placeholder::Namespace) => vars.namespace,
            });
        }
        out
    }

    /// Expands the template into a topic name.
    ///
    /// # Errors
    /// [`TopicError`] if the result is not a valid topic name (too long; or a value that was not a valid topic
    /// part), or [`TopicError::NamespaceStartsWithDollar`] if it starts with `$`: nothing is ever routed into
    /// `$` topics.
    pub fn expand(&self, vars: TemplateVars<'_>) -> Result<TopicName, TopicError> {
        let out = self.substitute(vars);
        check_name(&out)?;
        if out.starts_with('$') {
            return Err(TopicError::NamespaceStartsWithDollar);
        }
        Ok(TopicName(out))
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[Placeholder] = &[
        Placeholder::Topic,
        Placeholder::Site,
        Placeholder::Namespace,
    ];

    fn vars<'a>(topic: &'a str) -> TemplateVars<'a> {
        TemplateVars {
            topic,
            site: "line1",
            namespace: "acme/plant1/line1",
        }
    }

    #[test]
    fn parse_and_expand_table() {
        let cases: &[(&str, &str, Result<&str, TemplateError>)] = &[
            (
                "{namespace}/{topic}",
                "telemetry/t",
                Ok("acme/plant1/line1/telemetry/t"),
            ),
            (
                "from/{site}/{topic}",
                "handoff/p42",
                Ok("from/line1/handoff/p42"),
            ),
            ("{topic}", "cmd/stop", Ok("cmd/stop")),
            ("fixed/topic", "x", Ok("fixed/topic")),
            ("x-{site}-y/{topic}", "a", Ok("x-line1-y/a")),
            ("", "x", Err(TemplateError::Empty)),
            ("$SYS/{topic}", "x", Err(TemplateError::Reserved)),
            (
                "a/+/{topic}",
                "x",
                Err(TemplateError::Wildcard {
                    at: 2,
                    wildcard: '+',
                }),
            ),
            (
                "a/#",
                "x",
                Err(TemplateError::Wildcard {
                    at: 2,
                    wildcard: '#',
                }),
            ),
            (
                "a/{topic",
                "x",
                Err(TemplateError::UnbalancedBrace { at: 2 }),
            ),
            (
                "a/{to{pic}",
                "x",
                Err(TemplateError::UnbalancedBrace { at: 2 }),
            ),
            (
                "a/topic}",
                "x",
                Err(TemplateError::UnbalancedBrace { at: 7 }),
            ),
            (
                "a/{plant}",
                "x",
                Err(TemplateError::UnknownPlaceholder {
                    name: "plant".into(),
                }),
            ),
            ("a\0", "x", Err(TemplateError::ContainsNul)),
        ];
        for (text, topic, want) in cases {
            let got = TopicTemplate::parse(text, ALL)
                .map(|t| t.expand(vars(topic)).expect("expands").into_string());
            assert_eq!(
                got.as_deref().map_err(Clone::clone),
                *want,
                "template {text:?}"
            );
        }
    }

    #[test]
    fn unavailable_placeholder_is_refused() {
        assert_eq!(
            TopicTemplate::parse("{namespace}/x", &[Placeholder::Topic]),
            Err(TemplateError::UnavailablePlaceholder {
                placeholder: Placeholder::Namespace
            })
        );
    }

    #[test]
    fn namespace_containment() {
        let cases = [
            ("{namespace}/{topic}", true),
            ("{namespace}/x", true),
            ("{namespace}/", false),
            ("{namespace}x/{topic}", false),
            ("{namespace}", false),
            ("{topic}/{namespace}", false),
            ("a/{namespace}/{topic}", false),
        ];
        for (text, want) in cases {
            let t = TopicTemplate::parse(text, ALL).expect("valid");
            assert_eq!(t.is_inside_namespace(), want, "{text}");
        }
    }

    #[test]
    fn expansion_into_dollar_is_refused() {
        let t = TopicTemplate::parse("{topic}", ALL).expect("valid");
        assert_eq!(
            t.expand(vars("$SYS/x")),
            Err(TopicError::NamespaceStartsWithDollar)
        );
        assert!(t.starts_with_topic());
    }
}
