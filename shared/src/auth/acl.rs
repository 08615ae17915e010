//! Topic ACLs with the semantics of Mosquitto's `acl_file`, so a site's existing file works unchanged:
//!
//! ```text
//! # Lines before the first `user` apply to anonymous clients.
//! topic read $SYS/#
//! user robot5
//! topic write telemetry/robot5/#        # read | write | readwrite (the default) | deny
//! pattern write sensors/%u/#            # every client; %u = user name, %c = client id
//! ```
//!
//! Once an ACL is configured, everything it does not grant is denied, and `deny` wins over any grant.
//! A PUBLISH needs `write` on its topic. A SUBSCRIBE filter needs `read` on an ACL filter that covers every
//! topic the subscription can match (so `telemetry/#` is not granted by `telemetry/robot5/#`), and is
//! denied if it could match any topic a `deny` line names. Deciding at SUBSCRIBE time is what lets the
//! subscriber be told (MQTT 5 reason 0x87, 3.1.1 0x80) instead of silently receiving less; Mosquitto
//! instead grants such a subscription and filters each delivery.
//!
//! As in Mosquitto, `%u`/`%c` patterns do not apply to a client whose user name or client id contains
//! `/`, `+` or `#` (it could otherwise widen its own pattern), and `%u` lines do not apply to anonymous
//! clients.

use crate::topic::{TopicFilter, TopicName};

/// What a line grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe and receive.
    Read,
    /// Publish.
    Write,
    /// Both.
    ReadWrite,
    /// Neither, whatever else grants it.
    Deny,
}

impl Access {
    const fn reads(self) -> bool {
        matches!(self, Self::Read | Self::ReadWrite)
    }

    const fn writes(self) -> bool {
        matches!(self, Self::Write | Self::ReadWrite)
    }
}

/// Whose line it is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Before any `user` line: anonymous clients.
    Anonymous,
    /// After `user NAME`.
    User(String),
    /// A `pattern` line: everyone, with substitutions.
    Pattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    scope: Scope,
    access: Access,
    /// The filter (for a pattern, before substitution).
    topic: String,
}

/// A line of an ACL file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct AclError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub what: String,
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// The authenticated user name (from CONNECT or the client certificate); `None`: anonymous.
    pub user: Option<&'a str>,
    /// The MQTT client id.
    pub client_id: &'a str,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    /// Parses a whole file; every bad line is reported.
    ///
    /// # Errors
    /// One [`AclError`] per unusable line (unknown keyword or access, invalid topic filter).
    pub fn parse(text: &str) -> Result<Self, Vec<AclError>> {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        let mut scope = Scope::Anonymous;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |what: String| AclError { line: i + 1, what };
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        errors.push(error("`user` needs a name".to_owned()));
                    } else {
                        scope = Scope::User(rest.to_owned());
                    }
                }
                "topic" | "pattern" => {
                    let (access, topic) = match rest.split_once(char::is_whitespace) {
                        Some((a, t)) if access_word(a).is_some() => {
                            (access_word(a).unwrap_or(Access::ReadWrite), t.trim())
                        }
                        _ if access_word(rest).is_some() => {
                            errors.push(error(format!("`{keyword} {rest}` names no topic")));
                            continue;
                        }
                        _ => (Access::ReadWrite, rest),
                    };
                    if topic.is_empty() {
                        errors.push(error(format!("`{keyword}` names no topic")));
                        continue;
                    }
                    // A pattern is checked with its placeholders standing for one level.
                    let checked = topic.replace("%u", "u").replace("%c", "c");
                    if let Err(e) = TopicFilter::parse(&checked) {
                        errors.push(error(format!("invalid topic filter {topic:?}: {e}")));
                        continue;
                    }
                    rules.push(Rule {
                        scope: if keyword == "pattern" {
                            Scope::Pattern
                        } else {
                            scope.clone()
                        },
                        access,
                        topic: topic.to_owned(),
                    });
                }
                other => errors.push(error(format!(
                    "unknown keyword {other:?} (expected user, topic or pattern)"
                ))),
            }
        }
        if errors.is_empty() {
            Ok(Self { rules })
        } else {
            Err(errors)
        }
    }

    /// The filters that apply to `client`, with their access.
    fn applicable<'a>(&'a self, client: Client<'a>) -> impl Iterator<Item = (Access, String)> + 'a {
        let unsafe_for_patterns = |s: &str| s.contains(['/', '+', '#']);
        self.rules.iter().filter_map(move |r| {
            let topic = match &r.scope {
                Scope::Anonymous if client.user.is_none() => r.topic.clone(),
                Scope::User(u) if client.user == Some(u.as_str()) => r.topic.clone(),
                Scope::Pattern => {
                    let mut t = r.topic.clone();
                    if t.contains("%u") {
                        let user = client.user.filter(|u| !unsafe_for_patterns(u))?;
                        t = t.replace("%u", user);
                    }
                    if t.contains("%c") {
                        if unsafe_for_patterns(client.client_id) {
                            return None;
                        }
                        t = t.replace("%c", client.client_id);
                    }
                    t
                }
                _ => return None,
            };
            Some((r.access, topic))
        })
    }

    /// Whether `client` may publish to `topic`.
    #[must_use]
    pub fn can_publish(&self, client: Client<'_>, topic: &str) -> bool {
        let Ok(name) = TopicName::parse(topic) else {
            return false;
        };
        let mut granted = false;
        for (access, filter) in self.applicable(client) {
            let Ok(filter) = TopicFilter::parse(&filter) else {
                continue;
            };
            if filter.matches(&name) {
                if access == Access::Deny {
                    return false;
                }
                granted |= access.writes();
            }
        }
        granted
    }

    /// Whether `client` may subscribe to `filter` (see the module docs).
    #[must_use]
    pub fn can_subscribe(&self, client: Client<'_>, filter: &str) -> bool {
        let mut granted = false;
        for (access, acl) in self.applicable(client) {
            if access == Access::Deny {
                if overlaps(filter, &acl) {
                    return false;
                }
            } else if access.reads() && covers(&acl, filter) {
                granted = true;
            }
        }
        granted
    }
}

fn access_word(word: &str) -> Option<Access> {
    match word {
        "read" => Some(Access::Read),
        "write" => Some(Access::Write),
        "readwrite" => Some(Access::ReadWrite),
        "deny" => Some(Access::Deny),
        _ => None,
    }
}

/// Whether every topic `inner` matches is matched by `outer` (both valid filters).
#[must_use]
pub fn covers(outer: &str, inner: &str) -> bool {
    // A first-level wildcard does not match `$` topics, which a literal `$` level in `inner` names.
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic matches both filters.
#[must_use]
pub fn overlaps(a: &str, b: &str) -> bool {
    let dollar = |f: &str| f.starts_with('$');
    let wild_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (dollar(a) && wild_first(b)) || (dollar(b) && wild_first(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "
# anonymous clients
topic read public/#
user robot5
topic write telemetry/robot5/#
topic telemetry/robot5/cmd
topic deny telemetry/robot5/secret
user viewer
topic read telemetry/#
topic deny telemetry/+/secret
pattern write sensors/%u/#
pattern read devices/%c/#
";

    fn who<'a>(user: Option<&'a str>, client_id: &'a str) -> Client<'a> {
        Client { user, client_id }
    }

    #[test]
    fn publish_needs_write_and_deny_wins() {
        let acl = Acl::parse(FILE).expect("valid");
        let robot5 = who(Some("robot5"), "r5");
        assert!(acl.can_publish(robot5, "telemetry/robot5/temp"));
        assert!(!acl.can_publish(robot5, "telemetry/robot6/temp"));
        assert!(
            acl.can_publish(robot5, "telemetry/robot5/cmd"),
            "readwrite by default"
        );
        assert!(
            !acl.can_publish(robot5, "telemetry/robot5/secret"),
            "deny wins"
        );
        assert!(acl.can_publish(robot5, "sensors/robot5/t"), "pattern %u");
        assert!(!acl.can_publish(robot5, "sensors/robot6/t"));
        let anon = who(None, "x");
        assert!(!acl.can_publish(anon, "public/a"), "read only");
        assert!(
            !acl.can_publish(anon, "sensors/x/t"),
            "%u never applies to anonymous"
        );
    }

    #[test]
    fn subscribe_needs_a_covering_read_grant() {
        let acl = Acl::parse(FILE).expect("valid");
        let viewer = who(Some("viewer"), "v1");
        assert!(acl.can_subscribe(viewer, "telemetry/robot5/temp"));
        assert!(acl.can_subscribe(viewer, "telemetry/+/temp"));
        assert!(
            !acl.can_subscribe(viewer, "telemetry/#"),
            "could match a denied secret"
        );
        assert!(!acl.can_subscribe(viewer, "#"), "not covered");
        assert!(acl.can_subscribe(viewer, "devices/v1/#"), "pattern %c");
        assert!(!acl.can_subscribe(viewer, "devices/v2/#"));
        let robot5 = who(Some("robot5"), "r5");
        assert!(
            !acl.can_subscribe(robot5, "telemetry/robot5/#"),
            "write only"
        );
        assert!(acl.can_subscribe(robot5, "telemetry/robot5/cmd"));
        let anon = who(None, "x");
        assert!(acl.can_subscribe(anon, "public/news"));
        assert!(!acl.can_subscribe(anon, "telemetry/robot5/temp"));
    }

    #[test]
    fn patterns_do_not_apply_to_names_that_could_widen_them() {
        let acl = Acl::parse("pattern readwrite devices/%c/#\npattern write sensors/%u/#")
            .expect("valid");
        assert!(acl.can_publish(who(None, "d1"), "devices/d1/x"));
        assert!(!acl.can_publish(who(None, "+"), "devices/d1/x"));
        assert!(!acl.can_publish(who(Some("a/b"), "c"), "sensors/a/b/x"));
        assert!(!acl.can_subscribe(who(None, "#"), "devices/#"));
    }

    #[test]
    fn bad_lines_are_all_reported() {
        let errors =
            Acl::parse("user\ntopic read\nfrobnicate x\ntopic write a/#/b\ntopic read ok/#\n")
                .expect_err("bad");
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![1, 2, 3, 4], "{errors:?}");
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/b/#"));
        assert!(covers("a/+/c", "a/b/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x/+"));
        assert!(overlaps("a/+", "+/b"));
        assert!(overlaps("a/#", "a"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(!overlaps("a/b", "a/b/c"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("+".to_owned())
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        (proptest::collection::vec(level(), 1..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            levels.join("/")
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..5)
            .prop_map(|l| l.join("/"))
    }

    proptest! {
        /// `covers` and `overlaps` agree with matching on concrete topics.
        #[test]
        fn set_relations_agree_with_matching(outer in filter(), inner in filter(), topics in proptest::collection::vec(topic(), 1..30)) {
            let o = TopicFilter::parse(&outer).expect("valid");
            let i = TopicFilter::parse(&inner).expect("valid");
            for t in &topics {
                let name = TopicName::parse(t).expect("valid");
                if covers(&outer, &inner) && i.matches(&name) {
                    prop_assert!(o.matches(&name), "{} covers {} but not {}", outer, inner, t);
                }
                if o.matches(&name) && i.matches(&name) {
                    prop_assert!(overlaps(&outer, &inner), "{} and {} both match {}", outer, inner, t);
                }
            }
        }

        #[test]
        fn parse_is_total(text in "\\PC{0,200}") {
            let _ = Acl::parse(&text);
        }
    }
}
