use proptest::prelude::*;

use super::*;

fn name(s: &str) -> TopicName {
    TopicName::parse(s).expect("test topic name is valid")
}

fn filter(s: &str) -> TopicFilter {
    TopicFilter::parse(s).expect("test topic filter is valid")
}

#[test]
fn name_validation_table() {
    let max = "a".repeat(MAX_TOPIC_LEN);
    let over = "a".repeat(MAX_TOPIC_LEN + 1);
    let cases: &[(&str, Result<(), TopicError>)] = &[
        ("a", Ok(())),
        ("a/b/c", Ok(())),
        ("/", Ok(())),
        ("//", Ok(())),
        ("/a", Ok(())),
        ("a/", Ok(())),
        ("a//b", Ok(())),
        ("$SYS/broker", Ok(())),
        ("with space", Ok(())),
        ("日本/é", Ok(())),
        (&max, Ok(())),
        ("", Err(TopicError::Empty)),
        (
            &over,
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 1,
                max: MAX_TOPIC_LEN,
            }),
        ),
        ("a\0b", Err(TopicError::ContainsNul { at: 1 })),
        ("\0", Err(TopicError::ContainsNul { at: 0 })),
        (
            "+",
            Err(TopicError::WildcardInName {
                at: 0,
                wildcard: '+',
            }),
        ),
        (
            "a/#",
            Err(TopicError::WildcardInName {
                at: 2,
                wildcard: '#',
            }),
        ),
        (
            "é/a+b",
            Err(TopicError::WildcardInName {
                at: 4,
                wildcard: '+',
            }),
        ),
    ];
    for (input, want) in cases {
        let got = TopicName::parse(input).map(|n| assert_eq!(n.as_str(), *input));
        let short: String = input.chars().take(20).collect();
        assert_eq!(&got, want, "name {short:?}");
        // The owned conversion applies the same rules.
        assert_eq!(
            TopicName::try_from((*input).to_owned()).map(|_| ()),
            *want,
            "owned name {short:?}"
        );
    }
}

#[test]
fn filter_validation_table() {
    let misplaced = |level, at, wildcard| {
        Err(TopicError::MisplacedWildcard {
            level,
            at,
            wildcard,
        })
    };
    let over = format!("{}/#", "a".repeat(MAX_TOPIC_LEN - 1));
    let cases: &[(&str, Result<(), TopicError>)] = &[
        ("a", Ok(())),
        ("#", Ok(())),
        ("+", Ok(())),
        ("a/#", Ok(())),
        ("/#", Ok(())),
        ("+/+", Ok(())),
        ("+/#", Ok(())),
        ("a/+/b", Ok(())),
        ("a//+", Ok(())),
        ("//", Ok(())),
        ("$SYS/#", Ok(())),
        ("", Err(TopicError::Empty)),
        (
            &over,
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 1,
                max: MAX_TOPIC_LEN,
            }),
        ),
        ("a/\0", Err(TopicError::ContainsNul { at: 2 })),
        ("a#", misplaced(0, 1, '#')),
        ("#a", misplaced(0, 0, '#')),
        ("a/#/b", misplaced(1, 2, '#')),
        ("#/", misplaced(0, 0, '#')),
        ("##", misplaced(0, 0, '#')),
        ("a/b+", misplaced(1, 3, '+')),
        ("+a", misplaced(0, 0, '+')),
        ("a/++", misplaced(1, 2, '+')),
        ("a/+#", misplaced(1, 2, '+')),
        ("é/#é", misplaced(1, 3, '#')),
    ];
    for (input, want) in cases {
        let got = TopicFilter::parse(input).map(|f| assert_eq!(f.as_str(), *input));
        let short: String = input.chars().take(20).collect();
        assert_eq!(&got, want, "filter {short:?}");
    }
}

/// One parsed line of `testdata/topic_match.txt`.
struct MatchCase {
    line: usize,
    filter: TopicFilter,
    name: TopicName,
    want: bool,
}

fn parse_match_fixture(text: &str) -> Vec<MatchCase> {
    let mut cases = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') {
            continue;
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        let [f, n, "->", outcome] = fields[..] else {
            panic!(
                "topic_match.txt:{line}: expected `<filter> <name> -> match|no-match`, got {raw:?}"
            );
        };
        let want = match outcome {
            "match" => true,
            "no-match" => false,
            other => panic!("topic_match.txt:{line}: unknown outcome {other:?}"),
        };
        let filter = TopicFilter::parse(f)
            .unwrap_or_else(|e| panic!("topic_match.txt:{line}: bad filter {f:?}: {e}"));
        let name = TopicName::parse(n)
            .unwrap_or_else(|e| panic!("topic_match.txt:{line}: bad name {n:?}: {e}"));
        cases.push(MatchCase {
            line,
            filter,
            name,
            want,
        });
    }
    cases
}

#[test]
fn match_fixture() {
    let cases = parse_match_fixture(include_str!("../../testdata/topic_match.txt"));
    assert!(cases.len() > 50, "fixture lost its cases: {}", cases.len());
    for case in &cases {
        assert_eq!(
            case.filter.matches(&case.name),
            case.want,
            "topic_match.txt:{}: {} vs {}",
            case.line,
            case.filter,
            case.name
        );
        assert_eq!(
            reference_matches(case.filter.as_str(), case.name.as_str()),
            case.want,
            "topic_match.txt:{}: the reference disagrees with the fixture",
            case.line
        );
    }
}

#[test]
fn matches_with_spaces_and_long_topics() {
    let cases: &[(&str, &str, bool)] = &[
        ("a b/+", "a b/c d", true),
        (" ", " ", true),
        (" /#", " ", true),
        ("+", " ", true),
    ];
    for (f, n, want) in cases {
        assert_eq!(filter(f).matches(&name(n)), *want, "{f:?} vs {n:?}");
    }
    let long = name(&"a/".repeat(MAX_TOPIC_LEN / 2));
    assert!(filter("#").matches(&long));
    assert!(filter("a/#").matches(&long));
    assert!(!filter("b/#").matches(&long));
}

#[test]
fn a_name_as_filter_matches_only_itself() {
    let f = TopicFilter::from(name("a/b"));
    assert!(!f.has_wildcards());
    assert!(f.matches(&name("a/b")));
    assert!(!f.matches(&name("a/b/c")));
    assert!(filter("a/+").has_wildcards());
    assert!(filter("#").has_wildcards());
}

#[test]
fn filter_set() {
    let set: TopicFilters = ["sensors/+/temp", "alarms/#", "$SYS/broker/load"]
        .into_iter()
        .map(filter)
        .collect();
    assert_eq!(set.len(), 3);
    let cases: &[(&str, Option<&str>)] = &[
        ("sensors/m1/temp", Some("sensors/+/temp")),
        ("alarms", Some("alarms/#")),
        ("alarms/fire/3", Some("alarms/#")),
        ("$SYS/broker/load", Some("$SYS/broker/load")),
        ("sensors/m1/humidity", None),
        ("$SYS/broker/uptime", None),
    ];
    for (n, want) in cases {
        let n = name(n);
        assert_eq!(
            set.first_match(&n).map(TopicFilter::as_str),
            *want,
            "first_match {n}"
        );
        assert_eq!(set.matches_any(&n), want.is_some(), "matches_any {n}");
    }
    let empty = TopicFilters::new();
    assert!(empty.is_empty());
    assert!(!empty.matches_any(&name("a")));
}

#[test]
fn serde_round_trips_and_validates() {
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Route {
        topic: TopicName,
        select: TopicFilters,
    }
    let text = "topic = \"a/b\"\nselect = [\"a/+\", \"#\"]\n";
    let route: Route = toml::from_str(text).expect("valid route");
    assert_eq!(route.topic.as_str(), "a/b");
    assert_eq!(route.select.len(), 2);
    assert_eq!(toml::to_string(&route).expect("serializes"), text);

    let bad_name = toml::from_str::<Route>("topic = \"a/+\"\nselect = []\n").expect_err("wildcard");
    assert!(bad_name.to_string().contains("wildcard"), "{bad_name}");
    let bad_filter =
        toml::from_str::<Route>("topic = \"a\"\nselect = [\"a/#/b\"]\n").expect_err("misplaced");
    assert!(bad_filter.to_string().contains("misplaced"), "{bad_filter}");
}

#[test]
fn levels_and_conversions() {
    let n = name("a//b");
    assert_eq!(n.levels().collect::<Vec<_>>(), ["a", "", "b"]);
    assert_eq!(n.to_string(), "a//b");
    assert_eq!("a//b".parse::<TopicName>(), Ok(n.clone()));
    let mut set = std::collections::HashSet::new();
    set.insert(n.clone());
    assert!(set.contains("a//b"), "Borrow<str> lookups work");
    assert_eq!(String::from(n), "a//b");
    assert_eq!(
        TopicFilter::try_from("a/#").map(String::from),
        Ok("a/#".to_owned())
    );
}

/// A deliberately different matcher, written from the spec as a recursion over level slices, used to
/// cross-check [`TopicFilter::matches`].
fn reference_matches(filter: &str, name: &str) -> bool {
    fn go(f: &[&str], n: &[&str]) -> bool {
        match (f.first(), n.first()) {
            (Some(&"#"), _) => true,
            (None, None) => true,
            (Some(&fl), Some(&nl)) if fl == "+" || fl == nl => go(&f[1..], &n[1..]),
            _ => false,
        }
    }
    let f: Vec<&str> = filter.split('/').collect();
    let n: Vec<&str> = name.split('/').collect();
    if name.starts_with('$') && (f[0] == "+" || f[0] == "#") {
        return false;
    }
    go(&f, &n)
}

/// Topic levels from a small alphabet so that random filters and names collide often.
fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("$s".to_owned()),
        Just("é".to_owned()),
        "[ab$]{1,3}",
    ]
}

fn name_strategy() -> impl Strategy<Value = TopicName> {
    prop::collection::vec(level(), 1..6).prop_filter_map("topic must be non-empty", |levels| {
        TopicName::parse(&levels.join("/")).ok()
    })
}

/// A filter made by editing a name: each level kept, replaced, or turned into `+`; optionally cut short
/// with `#` or extended. Produces both matching and non-matching pairs.
fn filter_for(name: &TopicName) -> impl Strategy<Value = TopicFilter> {
    let levels: Vec<String> = name.levels().map(str::to_owned).collect();
    let n = levels.len();
    (
        prop::collection::vec((0u8..4, level()), n),
        0..=n + 1,
        any::<bool>(),
        prop::option::of(level()),
    )
        .prop_filter_map(
            "filter must be non-empty",
            move |(edits, cut, hash, extra)| {
                let mut out: Vec<String> = levels
                    .iter()
                    .zip(edits)
                    .map(|(orig, (op, other))| match op {
                        0 | 1 => orig.clone(),
                        2 => "+".to_owned(),
                        _ => other,
                    })
                    .collect();
                if let Some(extra) = extra {
                    out.push(extra);
                }
                if hash {
                    out.truncate(cut);
                    out.push("#".to_owned());
                }
                // Only a lone empty level can fail (an empty filter); wildcards are placed by construction.
                TopicFilter::parse(&out.join("/")).ok()
            },
        )
}

proptest! {
    #[test]
    fn matches_agrees_with_reference(
        (n, f) in name_strategy().prop_flat_map(|n| { let f = filter_for(&n); (Just(n), f) })
    ) {
        prop_assert_eq!(f.matches(&n), reference_matches(f.as_str(), n.as_str()), "{} vs {}", f, n);
    }

    #[test]
    fn matches_agrees_with_reference_on_unrelated_pairs(
        n in name_strategy(),
        levels in prop::collection::vec(prop_oneof![level(), Just("+".to_owned())], 1..6),
        hash in any::<bool>(),
    ) {
        let mut levels = levels;
        if hash {
            levels.push("#".to_owned());
        }
        let joined = levels.join("/");
        prop_assume!(!joined.is_empty());
        let f = filter(&joined);
        prop_assert_eq!(f.matches(&n), reference_matches(f.as_str(), n.as_str()), "{} vs {}", f, n);
    }

    #[test]
    fn every_name_matches_itself_and_hash_unless_dollar(n in name_strategy()) {
        prop_assert!(TopicFilter::from(n.clone()).matches(&n));
        prop_assert_eq!(filter("#").matches(&n), !n.as_str().starts_with('$'));
    }
}
