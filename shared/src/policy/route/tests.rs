use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::config::{DedupKeyKind, RouteConfig, SiteConfig, SiteSelector};
use crate::policy::path::PATH_PROPERTY;

/// The hub config of the local mesh, with `routes` appended.
fn hub(routes: &str) -> HubConfig {
    let text = format!(
        r#"
data_dir = "state"
[listen]
quic = "127.0.0.1:4433"
[tls]
ca = "ca.pem"
cert = "hub.pem"
key = "hub.key"
[broker]
kind = "embedded"
allow_anonymous = true
[[sites]]
name = "line1"
namespace = "acme/plant1/{{site}}"
[[sites]]
name = "line2"
namespace = "acme/plant1/{{site}}"
{routes}
"#
    );
    HubConfig::from_toml_str(&text, Path::new("/cfg")).unwrap_or_else(|e| panic!("{e}"))
}

/// The three route kinds of issue 8, as shipped in configs/hub.toml.
const MESH: &str = r#"
[[routes]]
name = "telemetry"
kind = "uplink"
from = "*"
filter = "telemetry/#"

[[routes]]
name = "commands"
kind = "downlink"
to = "*"
filter = "cmd/#"

[[routes]]
name = "handoff"
kind = "site-to-site"
from = "line1"
to = "line2"
filter = "handoff/#"
topic = "from/{site}/{topic}"
"#;

fn table(routes: &str) -> RouteTable {
    RouteTable::new(&hub(routes)).unwrap_or_else(|e| panic!("{e:?}"))
}

fn msg<'a>(topic: &'a str, user: &'a [(String, String)]) -> Message<'a> {
    Message {
        topic,
        qos: QoS::AtLeastOnce,
        retain: false,
        payload: b"p",
        user,
        seq: Some(1),
    }
}

fn path_prop(value: &str) -> Vec<(String, String)> {
    vec![(PATH_PROPERTY.to_owned(), value.to_owned())]
}

/// `(target place, topic, path)` of each delivery.
fn summary(decision: &Decision) -> Vec<(String, String, String)> {
    decision
        .deliveries
        .iter()
        .map(|d| {
            (
                d.target.place().to_owned(),
                d.topic.to_string(),
                d.path.to_value(),
            )
        })
        .collect()
}

fn owned(rows: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect()
}

#[test]
fn the_three_route_kinds() {
    let t = table(MESH);
    let mut dd = RouteDedups::new();
    // (from: None = cloud, else site; topic; path property; expected deliveries)
    type Case = (
        Option<&'static str>,
        &'static str,
        Option<&'static str>,
        &'static [(&'static str, &'static str, &'static str)],
    );
    let cases: &[Case] = &[
        (
            Some("line1"),
            "telemetry/robot5/temp",
            None,
            &[(
                "$cloud",
                "acme/plant1/line1/telemetry/robot5/temp",
                "line1,$cloud",
            )],
        ),
        (
            Some("line2"),
            "telemetry/t",
            None,
            &[("$cloud", "acme/plant1/line2/telemetry/t", "line2,$cloud")],
        ),
        (
            None,
            "acme/plant1/line2/cmd/stop",
            None,
            &[("line2", "cmd/stop", "$cloud,line2")],
        ),
        (
            None,
            "acme/plant1/line1/cmd/a/b",
            None,
            &[("line1", "cmd/a/b", "$cloud,line1")],
        ),
        (
            Some("line1"),
            "handoff/part42",
            None,
            &[("line2", "from/line1/handoff/part42", "line1,line2")],
        ),
        // Not routed: handoff only from line1; no downlink for telemetry; outside every namespace.
        (Some("line2"), "handoff/part42", None, &[]),
        (None, "acme/plant1/line1/telemetry/x", None, &[]),
        (None, "acme/plant1/line10/cmd/x", None, &[]),
        (None, "other/cmd/x", None, &[]),
        // `$` topics: a wildcard first level never matches them.
        (None, "acme/plant1/line2/$SYS/cmd", None, &[]),
        (Some("line1"), "$SYS/telemetry/x", None, &[]),
        // Echoes: what the uplink published comes back through the cloud broker; line2 recaptures a command
        // it was sent (if it also uplinked cmd/#); line2 recaptures the handoff.
        (None, "acme/plant1/line1/cmd/x", Some("line1,$cloud"), &[]),
        (
            Some("line2"),
            "from/line1/handoff/p",
            Some("line1,line2"),
            &[],
        ),
    ];
    for (from, topic, path, want) in cases {
        let user = path.map(path_prop).unwrap_or_default();
        let m = msg(topic, &user);
        let got = match from {
            Some(site) => t.from_site(site, &m, &mut dd, 0),
            None => t.from_cloud(&m, &mut dd, 0),
        }
        .unwrap_or_else(|e| panic!("{topic}: {e}"));
        assert_eq!(summary(&got), owned(want), "{from:?} {topic}");
    }
}

#[test]
fn uplink_plus_downlink_on_one_site_does_not_echo() {
    let t = table(
        r#"
[[routes]]
name = "cmd-up"
kind = "uplink"
from = "line2"
filter = "cmd/#"
[[routes]]
name = "cmd-down"
kind = "downlink"
to = "line2"
filter = "cmd/#"
"#,
    );
    let mut dd = RouteDedups::new();
    let down = t
        .from_cloud(&msg("acme/plant1/line2/cmd/stop", &[]), &mut dd, 0)
        .expect("routes");
    assert_eq!(
        summary(&down),
        owned(&[("line2", "cmd/stop", "$cloud,line2")])
    );
    // line2's broker delivers it to the agent's cmd/# capture, with the path the hub set.
    let d = &down.deliveries[0];
    let user = d.user_properties(&[]);
    let up = t
        .from_site("line2", &msg("cmd/stop", &user), &mut dd, 0)
        .expect("routes");
    assert!(up.deliveries.is_empty());
    assert_eq!(
        up.skipped,
        [Skipped {
            route: "cmd-up".into(),
            reason: SkipReason::OnPath {
                target: Target::Cloud
            }
        }]
    );
    // And a command published at line2 itself goes up once, and is not sent back down.
    let up = t
        .from_site("line2", &msg("cmd/local", &[]), &mut dd, 0)
        .expect("routes");
    let user = up.deliveries[0].user_properties(&[]);
    let back = t
        .from_cloud(&msg("acme/plant1/line2/cmd/local", &user), &mut dd, 0)
        .expect("routes");
    assert!(back.deliveries.is_empty(), "{back:?}");
}

#[test]
fn qos_cap_and_retain_handling() {
    let routes = |qos: &str, retain: &str| {
        format!(
            "[[routes]]\nname = \"r\"\nkind = \"uplink\"\nfrom = \"*\"\nfilter = \"#\"\n{qos}\nretain = \"{retain}\"\n"
        )
    };
    // (qos line, retain, published qos, published retain, expected (qos, retain) or None)
    let cases = [
        (
            "",
            "keep",
            QoS::ExactlyOnce,
            true,
            Some((QoS::ExactlyOnce, true)),
        ),
        (
            "qos = 1",
            "keep",
            QoS::ExactlyOnce,
            true,
            Some((QoS::AtLeastOnce, true)),
        ),
        (
            "qos = 0",
            "keep",
            QoS::AtLeastOnce,
            false,
            Some((QoS::AtMostOnce, false)),
        ),
        (
            "qos = 2",
            "keep",
            QoS::AtMostOnce,
            false,
            Some((QoS::AtMostOnce, false)),
        ),
        (
            "",
            "clear",
            QoS::AtLeastOnce,
            true,
            Some((QoS::AtLeastOnce, false)),
        ),
        (
            "",
            "as-published",
            QoS::AtLeastOnce,
            true,
            Some((QoS::AtLeastOnce, true)),
        ),
        ("", "drop", QoS::AtLeastOnce, true, None),
        (
            "",
            "drop",
            QoS::AtLeastOnce,
            false,
            Some((QoS::AtLeastOnce, false)),
        ),
    ];
    for (qos_line, retain, qos, retained, want) in cases {
        let t = table(&routes(qos_line, retain));
        let m = Message {
            qos,
            retain: retained,
            ..msg("x", &[])
        };
        let got = t
            .from_site("line1", &m, &mut RouteDedups::new(), 0)
            .expect("routes");
        let got = got.deliveries.first().map(|d| (d.qos, d.retain));
        assert_eq!(got, want, "{qos_line} {retain} {qos:?} {retained}");
    }
}

#[test]
fn priority_ttl_and_first_route_wins() {
    let t = table(
        r#"
[[routes]]
name = "alarms"
kind = "uplink"
from = "*"
filter = "telemetry/alarms/#"
priority = 9
ttl = "10m"
[[routes]]
name = "all"
kind = "uplink"
from = "*"
filter = "telemetry/#"
"#,
    );
    let d = t
        .from_site(
            "line1",
            &msg("telemetry/alarms/fire", &[]),
            &mut RouteDedups::new(),
            0,
        )
        .expect("routes");
    assert_eq!(d.deliveries.len(), 1);
    let first = &d.deliveries[0];
    assert_eq!((first.route.as_str(), first.priority), ("alarms", 9));
    assert_eq!(first.expires_at_ms(1_000), Some(601_000));
    assert_eq!(
        d.skipped,
        [Skipped {
            route: "all".into(),
            reason: SkipReason::SameDestination {
                target: Target::Cloud,
                by: "alarms".into()
            }
        }]
    );
}

#[test]
fn redundant_pair_is_forwarded_once() {
    let t = table(
        r#"
[[routes]]
name = "telemetry"
kind = "uplink"
from = "*"
filter = "telemetry/#"
[routes.dedup]
key = "topic-payload"
window = "1m"
"#,
    );
    let mut dd = RouteDedups::new();
    // Agents A and B on line1's broker both forward the same message, with their own seqs.
    let a = Message {
        seq: Some(10),
        ..msg("telemetry/t", &[])
    };
    let b = Message {
        seq: Some(99),
        ..msg("telemetry/t", &[])
    };
    let first = t.from_site("line1", &a, &mut dd, 1_000).expect("routes");
    let second = t.from_site("line1", &b, &mut dd, 1_200).expect("routes");
    assert_eq!(first.deliveries.len(), 1);
    assert!(second.deliveries.is_empty());
    assert_eq!(second.skipped[0].reason, SkipReason::Duplicate);
    // The same payload from line2 is its own message.
    let other = t.from_site("line2", &a, &mut dd, 1_300).expect("routes");
    assert_eq!(other.deliveries.len(), 1);
    // After the window it passes again.
    let later = t.from_site("line1", &b, &mut dd, 61_000).expect("routes");
    assert_eq!(later.deliveries.len(), 1);
    let stats = dd.get("telemetry").expect("created").stats();
    assert_eq!((stats.passed, stats.dropped), (3, 1));
}

#[test]
fn message_level_refusals() {
    let t = table(MESH);
    let mut dd = RouteDedups::new();
    assert_eq!(
        t.from_site("line9", &msg("telemetry/x", &[]), &mut dd, 0),
        Err(RouteError::UnknownSite {
            site: "line9".into()
        })
    );
    assert!(matches!(
        t.from_site("line1", &msg("telemetry/#", &[]), &mut dd, 0),
        Err(RouteError::InvalidTopic { .. })
    ));
    let bad = path_prop("line1,,x");
    assert!(matches!(
        t.from_site("line1", &msg("telemetry/x", &bad), &mut dd, 0),
        Err(RouteError::Path(PathError::InvalidPlace { index: 1, .. }))
    ));
}

#[test]
fn cloud_filters_cover_each_destination() {
    let t = table(MESH);
    let filters: Vec<(String, QoS)> = t
        .cloud_filters()
        .into_iter()
        .map(|(f, q)| (f.into_string(), q))
        .collect();
    assert_eq!(
        filters,
        [
            ("acme/plant1/line1/cmd/#".to_owned(), QoS::ExactlyOnce),
            ("acme/plant1/line2/cmd/#".to_owned(), QoS::ExactlyOnce),
        ]
    );
}

#[test]
fn a_to_b_and_b_to_a_do_not_ping_pong() {
    let t = table(
        r#"
[[routes]]
name = "a-to-b"
kind = "site-to-site"
from = "line1"
to = "line2"
filter = "shared/#"
[[routes]]
name = "b-to-a"
kind = "site-to-site"
from = "line2"
to = "line1"
filter = "shared/#"
"#,
    );
    let hops = propagate(&t, Some("line1"), "shared/x");
    assert_eq!(hops, owned(&[("line2", "shared/x", "line1,line2")]));
}

/// Delivers a message, then lets every destination capture every delivery again (site brokers re-deliver to
/// the agents, the cloud broker to the hub's downlink subscriptions), as long as anything is produced.
/// Returns every delivery made. Panics if it does not settle: that would be a loop.
fn propagate(t: &RouteTable, origin: Option<&str>, topic: &str) -> Vec<(String, String, String)> {
    let mut dd = RouteDedups::new();
    /// (where it is published: a site or the cloud, topic, user properties)
    type Pending = (Option<String>, String, Vec<(String, String)>);
    let mut pending: Vec<Pending> = vec![(origin.map(str::to_owned), topic.to_owned(), Vec::new())];
    let mut made = Vec::new();
    let mut steps = 0;
    while let Some((at, topic, user)) = pending.pop() {
        steps += 1;
        assert!(steps < 10_000, "routing does not settle: {made:?}");
        let m = msg(&topic, &user);
        let decision = match &at {
            Some(site) => t.from_site(site, &m, &mut dd, 0),
            None => t.from_cloud(&m, &mut dd, 0),
        }
        .expect("valid message");
        for d in decision.deliveries {
            made.push((
                d.target.place().to_owned(),
                d.topic.to_string(),
                d.path.to_value(),
            ));
            let at = match &d.target {
                Target::Cloud => None,
                Target::Site(site) => Some(site.clone()),
            };
            pending.push((at, d.topic.to_string(), d.user_properties(&user)));
        }
    }
    made
}

fn site_names() -> Vec<String> {
    (0..4).map(|i| format!("s{i}")).collect()
}

fn arb_selector() -> impl Strategy<Value = SiteSelector> {
    prop_oneof![
        Just(SiteSelector::All),
        proptest::sample::subsequence(site_names(), 1..=4).prop_map(SiteSelector::List),
    ]
}

fn arb_route(i: usize) -> impl Strategy<Value = RouteConfig> {
    let filters = ["a/#", "a/+", "+/b", "#", "a/b", "b/#", "+", "from/#"];
    (
        0..3u8,
        arb_selector(),
        arb_selector(),
        proptest::sample::select(filters.to_vec()),
        0..3usize,
        prop::option::of(0..3u8),
    )
        .prop_map(move |(kind, from, to, filter, template, qos)| {
            let kind = [
                RouteKind::Uplink,
                RouteKind::Downlink,
                RouteKind::SiteToSite,
            ][usize::from(kind)];
            let topic = match kind {
                RouteKind::Uplink => [
                    "{namespace}/{topic}",
                    "{namespace}/up/{topic}",
                    "{namespace}/{site}",
                ][template],
                _ => ["{topic}", "from/{site}/{topic}", "x/{topic}"][template],
            };
            RouteConfig {
                name: format!("r{i}"),
                kind,
                from: (kind != RouteKind::Downlink).then_some(from),
                to: (kind != RouteKind::Uplink).then_some(to),
                filter: filter.to_owned(),
                topic: Some(topic.to_owned()),
                qos,
                retain: RetainHandling::Keep,
                priority: 0,
                ttl: None,
                dedup: None,
            }
        })
}

fn arb_table() -> impl Strategy<Value = RouteTable> {
    (1..6usize)
        .prop_flat_map(|n| (0..n).map(arb_route).collect::<Vec<_>>())
        .prop_map(|routes| {
            let mut config = hub("");
            config.sites = site_names()
                .into_iter()
                .map(|name| SiteConfig {
                    name,
                    namespace: "acme/{site}".into(),
                })
                .collect();
            config.routes = routes;
            RouteTable::new(&config).unwrap_or_else(|e| panic!("generated config is valid: {e:?}"))
        })
}

fn arb_topic() -> impl Strategy<Value = String> {
    prop::collection::vec(
        proptest::sample::select(vec!["a", "b", "from", "s1", "$x", ""]),
        1..5,
    )
    .prop_map(|levels| levels.join("/"))
    .prop_filter("non-empty topic", |t| !t.is_empty())
}

fn arb_path() -> impl Strategy<Value = Vec<String>> {
    let mut places = site_names();
    places.push(CLOUD.to_owned());
    proptest::sample::subsequence(places, 0..=3).prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn site_messages_respect_path_namespace_and_dollar(
        t in arb_table(),
        origin in 0..4usize,
        topic in arb_topic(),
        path in arb_path(),
        qos in 0..3u8,
    ) {
        let origin = format!("s{origin}");
        let user = if path.is_empty() { Vec::new() } else { path_prop(&path.join(",")) };
        let m = Message { qos: QoS::try_from(qos).expect("0..3"), ..msg(&topic, &user) };
        let decision = t.from_site(&origin, &m, &mut RouteDedups::new(), 0).expect("valid message");
        let namespace = &t.site(&origin).expect("known").namespace;
        for d in &decision.deliveries {
            let place = d.target.place();
            prop_assert!(place != origin, "delivered back to its origin: {d:?}");
            prop_assert!(!path.iter().any(|p| p == place), "delivered to a place on its path: {d:?}");
            prop_assert!(!d.topic.as_str().starts_with('$'), "$ topic: {d:?}");
            prop_assert!(d.qos <= m.qos);
            if d.target == Target::Cloud {
                prop_assert!(namespace.contains(&d.topic), "uplink outside the namespace: {d:?}");
            }
            // The delivered path is the input path, the origin, then the target.
            let mut want = path.clone();
            if want.last() != Some(&origin) { want.push(origin.clone()); }
            want.push(place.to_owned());
            prop_assert_eq!(d.path.places(), &want[..]);
        }
    }

    #[test]
    fn cloud_messages_reach_only_their_namespace_site(
        t in arb_table(),
        site in 0..5usize,
        local in arb_topic(),
        path in arb_path(),
    ) {
        // Site 4 does not exist: the topic is then outside every namespace.
        let topic = format!("acme/s{site}/{local}");
        let user = if path.is_empty() { Vec::new() } else { path_prop(&path.join(",")) };
        let decision = t.from_cloud(&msg(&topic, &user), &mut RouteDedups::new(), 0).expect("valid message");
        for d in &decision.deliveries {
            prop_assert_eq!(&d.target, &Target::Site(format!("s{site}")));
            prop_assert!(!path.iter().any(|p| p == d.target.place()));
            prop_assert!(!d.topic.as_str().starts_with('$'), "$ topic: {d:?}");
        }
    }

    #[test]
    fn no_config_loops(t in arb_table(), origin in 0..5usize, topic in arb_topic()) {
        // Whatever the routes, and with every broker echoing everything back, propagation settles and no
        // chain visits a place twice.
        let origin = (origin < 4).then(|| format!("s{origin}"));
        let topic = match &origin {
            Some(_) => topic,
            None => format!("acme/s1/{topic}"),
        };
        for (_, _, path) in propagate(&t, origin.as_deref(), &topic) {
            let places: Vec<&str> = path.split(',').collect();
            let mut unique = places.clone();
            unique.sort_unstable();
            unique.dedup();
            prop_assert_eq!(unique.len(), places.len(), "a place twice on {}", path);
        }
    }
}

#[test]
fn dedup_key_kinds_are_wired() {
    // meshbridge-id falls back to <origin>/<seq>: the same seq resent is dropped, another passes.
    let t = table(
        r##"
[[routes]]
name = "r"
kind = "uplink"
from = "*"
filter = "#"
dedup = { key = "meshbridge-id" }
"##,
    );
    assert_eq!(
        t.dedup_config("r").map(|d| d.key),
        Some(DedupKeyKind::MeshbridgeId)
    );
    let mut dd = RouteDedups::new();
    let n = |seq, dd: &mut RouteDedups| {
        let m = Message {
            seq: Some(seq),
            ..msg("x", &[])
        };
        t.from_site("line1", &m, dd, 0)
            .expect("routes")
            .deliveries
            .len()
    };
    assert_eq!(n(1, &mut dd), 1);
    assert_eq!(n(1, &mut dd), 0);
    assert_eq!(n(2, &mut dd), 1);
}
