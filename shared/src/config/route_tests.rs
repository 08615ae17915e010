//! Tests of `[[routes]]`: validation, effective configs and their versions, diffs, and the shipped
//! `configs/hub.toml`.

use std::path::Path;

use super::*;
use crate::policy::route::RouteTable;

const BASE: &str = r#"
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
namespace = "acme/plant1/{site}"
[[sites]]
name = "line2"
namespace = "acme/plant1/{site}"
"#;

fn parse(routes: &str) -> Result<HubConfig, ConfigError> {
    HubConfig::from_toml_str(&format!("{BASE}{routes}"), Path::new("/cfg"))
}

fn hub(routes: &str) -> HubConfig {
    parse(routes).unwrap_or_else(|e| panic!("{e}"))
}

fn problems(routes: &str) -> Vec<String> {
    match parse(routes) {
        Err(ConfigError::Invalid { errors, .. }) => {
            errors.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn shipped_hub() -> HubConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/hub.toml");
    let text = std::fs::read_to_string(&path).expect("configs/hub.toml readable");
    HubConfig::from_toml_str(&text, Path::new("/cfg")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn configs_without_routes_still_load() {
    assert!(hub("").routes.is_empty());
}

#[test]
fn selectors_accept_star_one_or_list() {
    let config = hub(r#"
[[routes]]
name = "a"
kind = "uplink"
from = "*"
filter = "x"
[[routes]]
name = "b"
kind = "uplink"
from = "line1"
filter = "x"
[[routes]]
name = "c"
kind = "uplink"
from = ["line1", "line2"]
filter = "x"
"#);
    let from: Vec<_> = config.routes.iter().map(|r| r.from.clone()).collect();
    assert_eq!(
        from,
        [
            Some(SiteSelector::All),
            Some(SiteSelector::List(vec!["line1".into()])),
            Some(SiteSelector::List(vec!["line1".into(), "line2".into()])),
        ]
    );
    // Serialized and read back identical.
    let text = toml::to_string(&config).expect("serializes");
    assert_eq!(
        HubConfig::from_toml_str(&text, Path::new("/unused")).expect("reads back"),
        config
    );
}

#[test]
fn every_route_problem_is_listed() {
    let got = problems(
        r#"
[[routes]]
name = "bad name"
kind = "uplink"
from = ["line1", "line9", "line1"]
to = "line2"
filter = "a/#/b"
topic = "cloud/{topic}"
qos = 3
priority = 10
ttl = "0s"

[[routes]]
name = "down"
kind = "downlink"
from = "line1"
filter = "$SYS/#"
topic = "{topic}/{namespace}"

[[routes]]
name = "down"
kind = "site-to-site"
from = []
filter = "$SYS/#"
topic = "{plant}/x"
dedup = { key = "property", window = "30d", max_keys = 0 }

[[routes]]
name = "dollar"
kind = "site-to-site"
from = "line1"
to = "line2"
filter = "$SYS/#"
dedup = { key = "topic-payload", property = "id" }
"#,
    );
    let want = [
        "routes[0].name: invalid route name `bad name`: site name has forbidden character ' ' at byte 3",
        "routes[0].from[1]: no site named `line9` in `sites` (write \"*\" alone for every site)",
        "routes[0].from[2]: duplicate of routes[0].from[0]",
        "routes[0].to: is not used by uplink routes; remove it",
        "routes[0].filter: invalid topic filter `a/#/b`: `#` must be alone in the last level",
        "routes[0].topic: uplink topic `cloud/{topic}` must start with `{namespace}/`, so a site only publishes into its own namespace",
        "routes[0].qos: must be between 0 and 2, got 3",
        "routes[0].priority: must be between 0 and 9, got 10",
        "routes[0].ttl: must be greater than zero",
        "routes[1].from: is not used by downlink routes; remove it",
        "routes[1].to: must be set for downlink routes",
        "routes[1].topic: invalid topic template `{topic}/{namespace}`: placeholder `{namespace}` is not available here",
        "routes[2].name: duplicate of routes[1].name",
        "routes[2].from: must not be empty",
        "routes[2].to: must be set for site-to-site routes",
        "routes[2].topic: invalid topic template `{plant}/x`: unknown placeholder `{plant}`: expected {topic}, {site} or {namespace}",
        "routes[2].dedup.window: must be between 1ms and 7days, got 30days",
        "routes[2].dedup.max_keys: must be between 1 and 4194304, got 0",
        "routes[2].dedup.key: is set but `routes[2].dedup.property` is not: set both or neither",
        "routes[3].filter: filter `$SYS/#` with a topic template starting with `{topic}` would deliver into `$` topics",
        "routes[3].dedup.property: is not used with dedup key `topic-payload`; remove it",
    ];
    assert_eq!(got, want);
}

#[test]
fn overlapping_namespaces_are_refused() {
    let text = BASE.replace(
        "name = \"line2\"\nnamespace = \"acme/plant1/{site}\"",
        "name = \"line2\"\nnamespace = \"acme/plant1/line1/sub\"",
    );
    let err = HubConfig::from_toml_str(&text, Path::new("/cfg")).expect_err("overlap");
    assert!(
        err.to_string().contains(
            "sites[1].namespace: `acme/plant1/line1/sub` overlaps sites[0].namespace (`acme/plant1/line1`)"
        ),
        "{err}"
    );
}

#[test]
fn downlink_filter_too_long_for_a_namespace_is_refused() {
    let filter = format!("{}/#", "a".repeat(65_520));
    let got = problems(&format!(
        "[[routes]]\nname = \"d\"\nkind = \"downlink\"\nto = \"*\"\nfilter = \"{filter}\"\n"
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("routes[0].filter: invalid topic filter"),
        "{got:?}"
    );
}

#[test]
fn shipped_hub_config_routes_the_local_mesh() {
    let config = shipped_hub();
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["telemetry", "commands", "handoff"]);
    let all = EffectiveConfig::for_all_sites(&config).expect("valid");
    let line1 = all[0].to_toml();
    assert_eq!(
        line1,
        r#"format = 1
site = "line1"

[[capture]]
filter = "handoff/#"
retain = "keep"
priority = 0
routes = ["handoff"]

[[capture]]
filter = "telemetry/#"
retain = "keep"
priority = 0
routes = ["telemetry"]

[[accept]]
filter = "cmd/#"
routes = ["commands"]
"#
    );
    let line2 = &all[1];
    let filters = |list: &[Accept]| list.iter().map(|a| a.filter.clone()).collect::<Vec<_>>();
    assert_eq!(filters(&line2.accept), ["cmd/#", "from/line1/handoff/#"]);
    assert_eq!(
        line2
            .capture
            .iter()
            .map(|c| c.filter.as_str())
            .collect::<Vec<_>>(),
        ["telemetry/#"],
        "line2 does not capture handoff/#: its route only goes line1 -> line2"
    );
    assert!(line2.accepts("from/line1/handoff/part42"));
    assert!(!line2.accepts("handoff/part42"));
}

#[test]
fn versions_are_stable_and_content_derived() {
    let config = shipped_hub();
    let push = |c: &HubConfig| {
        EffectiveConfig::for_all_sites(c)
            .expect("valid")
            .iter()
            .map(|e| e.to_push())
            .collect::<Vec<_>>()
    };
    let a = push(&config);
    // Same file, another "hub": same versions. Pinned, so a change of hash or format is noticed.
    assert_eq!(a, push(&shipped_hub()));
    assert!(a.iter().all(|p| p.version != 0));
    assert_eq!(a[0].version, version_of(&a[0].toml));
    assert_ne!(a[0].version, a[1].version);
    // Reordering routes does not change any site's document; changing one site's routes changes only its.
    let mut reordered = config.clone();
    reordered.routes.reverse();
    assert_eq!(push(&reordered), a);
    let mut changed = config.clone();
    changed.routes[2].topic = Some("handoff-from/{site}/{topic}".into());
    let b = push(&changed);
    assert_eq!(b[0], a[0], "line1's capture is unchanged");
    assert_ne!(b[1].version, a[1].version, "line2 accepts a new topic");
    assert_eq!(version_of(""), stable_hash_or_one(""));
}

fn stable_hash_or_one(text: &str) -> u64 {
    match crate::hash::stable_hash(text.as_bytes()) {
        0 => 1,
        v => v,
    }
}

#[test]
fn pushed_config_round_trips_and_invalid_pushes_are_refused() {
    let all = EffectiveConfig::for_all_sites(&shipped_hub()).expect("valid");
    for e in &all {
        assert_eq!(
            EffectiveConfig::from_toml_str(&e.to_toml()).expect("valid"),
            *e
        );
    }
    let bad = r#"format = 2
site = "line 1"

[[capture]]
filter = "a/#/b"
qos = 5
priority = 12

[[capture]]
filter = "a/#/b"

[[accept]]
filter = ""
"#;
    let err = EffectiveConfig::from_toml_str(bad).expect_err("invalid");
    let ConfigError::Invalid { errors, .. } = &err else {
        panic!("expected Invalid, got {err:?}")
    };
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "format",
            "site",
            "capture[0].filter",
            "capture[0].qos",
            "capture[0].priority",
            "capture[1].filter",
            "capture[1].filter",
            "accept[0].filter"
        ]
    );
    let unknown = EffectiveConfig::from_toml_str("format = 1\nsite = \"a\"\nextra = 1\n")
        .expect_err("unknown key");
    assert!(matches!(unknown, ConfigError::Parse { .. }), "{unknown:?}");
}

#[test]
fn bootstrap_config_comes_from_the_agent_file() {
    let routes = [
        Route {
            filter: "telemetry/#".into(),
            qos: Some(1),
            retain: true,
        },
        Route {
            filter: "status/#".into(),
            qos: None,
            retain: false,
        },
    ];
    let boot = EffectiveConfig::bootstrap("line1", &routes);
    assert_eq!(boot.capture.len(), 2);
    assert_eq!(boot.capture[0].qos, Some(1));
    assert_eq!(boot.capture[1].retain, RetainHandling::Clear);
    boot.validate().expect("valid");
}

#[test]
fn merged_captures_take_the_most_permissive_settings() {
    let config = hub(r#"
[[routes]]
name = "up"
kind = "uplink"
from = "*"
filter = "t/#"
qos = 0
retain = "drop"
priority = 2
ttl = "1h"
[[routes]]
name = "side"
kind = "site-to-site"
from = "line1"
to = "*"
filter = "t/#"
qos = 1
retain = "clear"
priority = 5
ttl = "2h"
"#);
    let table = RouteTable::new(&config).expect("valid");
    let line1 = EffectiveConfig::for_site(&table, "line1").expect("known");
    assert_eq!(line1.capture.len(), 1);
    let c = &line1.capture[0];
    assert_eq!(
        (c.qos, c.retain, c.priority, c.ttl),
        (
            Some(1),
            RetainHandling::Clear,
            5,
            Some(std::time::Duration::from_secs(7200))
        )
    );
    assert_eq!(c.routes, ["side", "up"]);
    // line2 captures only for "up" (side only captures at line1) and accepts line1's t/#.
    let line2 = EffectiveConfig::for_site(&table, "line2").expect("known");
    assert_eq!(line2.capture[0].routes, ["up"]);
    assert_eq!(line2.accept[0].filter, "t/#");
    assert!(EffectiveConfig::for_site(&table, "line9").is_none());
}

#[test]
fn diff_lists_sites_routes_pushes_and_restarts() {
    let old = shipped_hub();
    assert!(HubConfigDiff::between(&old, &old).is_empty());
    assert_eq!(
        HubConfigDiff::between(&old, &old).to_string(),
        "no changes\n"
    );

    let mut new = old.clone();
    new.sites.push(SiteConfig {
        name: "line3".into(),
        namespace: "acme/plant1/{site}".into(),
    });
    new.routes.retain(|r| r.name != "handoff");
    new.routes[0].qos = Some(1);
    new.routes[0].retain = RetainHandling::Clear;
    new.routes.push(RouteConfig {
        name: "alarms".into(),
        kind: RouteKind::Uplink,
        from: Some(SiteSelector::List(vec!["line3".into()])),
        to: None,
        filter: "alarms/#".into(),
        topic: None,
        qos: None,
        retain: RetainHandling::Keep,
        priority: 9,
        ttl: None,
        dedup: None,
    });
    new.listen.max_connections = 10;
    let diff = HubConfigDiff::between(&old, &new);
    let named = |list: &[NamedChange]| {
        list.iter()
            .map(|c| (c.name.clone(), c.change.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(named(&diff.sites), [("line3".to_owned(), Change::Added)]);
    assert_eq!(
        named(&diff.routes),
        [
            (
                "telemetry".to_owned(),
                Change::Altered(vec!["qos", "retain"])
            ),
            ("alarms".to_owned(), Change::Added),
            ("handoff".to_owned(), Change::Removed),
        ]
    );
    let pushed: Vec<(&str, bool, bool)> = diff
        .pushes
        .iter()
        .map(|p| (p.site.as_str(), p.old.is_some(), p.new.is_some()))
        .collect();
    assert_eq!(
        pushed,
        [
            ("line1", true, true),
            ("line2", true, true),
            ("line3", false, true)
        ]
    );
    assert_eq!(diff.restart, ["listen"]);
    let text = diff.to_string();
    for line in [
        "sites:\n  + line3 added\n",
        "routes:\n  ~ telemetry changed: qos, retain\n  + alarms added\n  - handoff removed\n",
        "pushes (new effective config, applied live):\n",
        "  + line3 (none) -> ",
        "restart needed for: listen\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}

#[test]
fn diff_of_a_route_change_pushes_only_the_sites_it_concerns() {
    let old = shipped_hub();
    let mut new = old.clone();
    new.routes[2].filter = "handoff/parts/#".into();
    let diff = HubConfigDiff::between(&old, &new);
    let sites: Vec<&str> = diff.pushes.iter().map(|p| p.site.as_str()).collect();
    assert_eq!(sites, ["line1", "line2"]);
    let mut new = old.clone();
    new.routes[1].priority = 3;
    let diff = HubConfigDiff::between(&old, &new);
    assert_eq!(diff.routes[0].change, Change::Altered(vec!["priority"]));
    let sites: Vec<&str> = diff.pushes.iter().map(|p| p.site.as_str()).collect();
    assert_eq!(
        sites,
        ["line1", "line2"],
        "a downlink priority adds a lane each destination must connect"
    );
    let mut again = new.clone();
    again.routes[1].priority = 5;
    let diff = HubConfigDiff::between(&new, &again);
    assert_eq!(diff.pushes.len(), 2, "another lane: pushed again");
}

#[test]
fn effective_lanes_list_the_priorities_delivered_to_a_site() {
    let mut hub = shipped_hub();
    // routes[1] is the downlink `commands` to every site, routes[2] line1's handoff to line2.
    hub.routes[1].priority = 7;
    hub.routes[2].priority = 3;
    let sites = EffectiveConfig::for_all_sites(&hub).expect("valid");
    let lanes: Vec<(&str, &[u8])> = sites
        .iter()
        .map(|s| (s.site.as_str(), s.lanes.as_slice()))
        .collect();
    assert_eq!(
        lanes,
        [("line1", &[7][..]), ("line2", &[3, 7][..])],
        "line1 only sends the handoff; line2 receives it"
    );
    let line2 = &sites[1];
    let text = line2.to_toml();
    assert!(text.contains("lanes = [3, 7]"), "{text}");
    assert_eq!(
        EffectiveConfig::from_toml_str(&text).expect("valid"),
        *line2
    );
    let mut bad = line2.clone();
    bad.lanes.push(12);
    let errors = bad.validate().expect_err("lane 12");
    assert!(errors[0].to_string().contains("lanes[2]"), "{errors:?}");
    assert!(
        !EffectiveConfig::for_all_sites(&shipped_hub()).expect("valid")[0]
            .to_toml()
            .contains("lanes"),
        "no priorities: the document keeps the text it always had"
    );
}
