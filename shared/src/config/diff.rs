//! What a new hub config changes compared with the running one: the dry run behind
//! `cloud-hub config diff NEW.toml`, and what a reload uses to decide which agents get a new push.
//!
//! Sites are matched by name and routes by name, so renaming one shows as a removal plus an addition.
//! Settings outside `sites` and `routes` (listener, TLS, broker, limits, ...) are listed by section only:
//! the hub applies routes live, but those need a restart, which the rendering says.

use std::fmt;

use super::effective::EffectiveConfig;
use super::hub::HubConfig;
use super::route::RouteConfig;
use crate::policy::route::RouteTable;

/// How one site or route changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Only in the new config.
    Added,
    /// Only in the old config.
    Removed,
    /// In both, with these fields different (config key names).
    Altered(Vec<&'static str>),
}

/// A changed site or route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedChange {
    /// The site or route name.
    pub name: String,
    /// What changed.
    pub change: Change,
}

/// A site whose effective config (what its agent is pushed) changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionChange {
    /// The site.
    pub site: String,
    /// Its version under the old config; `None` if it had none (new site, or the old config is invalid).
    pub old: Option<u64>,
    /// Its version under the new config; `None` if it has none (removed site, or the new config is invalid).
    pub new: Option<u64>,
}

/// Everything a config change changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubConfigDiff {
    /// Sites added, removed or altered, in new-config order then removed ones in old-config order.
    pub sites: Vec<NamedChange>,
    /// Routes added, removed or altered, in the same order.
    pub routes: Vec<NamedChange>,
    /// Sites whose effective config version changes: they get a new push.
    pub pushes: Vec<VersionChange>,
    /// Other top-level sections that differ; they take effect only after a restart.
    pub restart: Vec<&'static str>,
}

impl HubConfigDiff {
    /// Compares two configs. Both should be valid; an invalid one simply has no effective configs.
    #[must_use]
    pub fn between(old: &HubConfig, new: &HubConfig) -> Self {
        let sites = named_changes(
            &old.sites,
            &new.sites,
            |s| &s.name,
            |a, b| {
                let mut fields = Vec::new();
                if a.namespace != b.namespace {
                    fields.push("namespace");
                }
                fields
            },
        );
        let routes = named_changes(&old.routes, &new.routes, |r| &r.name, route_fields);
        let old_versions = versions(old);
        let new_versions = versions(new);
        let mut pushes = Vec::new();
        for (site, version) in &new_versions {
            let before = old_versions
                .iter()
                .find(|(s, _)| s == site)
                .map(|(_, v)| *v);
            if before != Some(*version) {
                pushes.push(VersionChange {
                    site: site.clone(),
                    old: before,
                    new: Some(*version),
                });
            }
        }
        for (site, version) in &old_versions {
            if !new_versions.iter().any(|(s, _)| s == site) {
                pushes.push(VersionChange {
                    site: site.clone(),
                    old: Some(*version),
                    new: None,
                });
            }
        }
        let mut restart = Vec::new();
        let mut section = |name, changed: bool| {
            if changed {
                restart.push(name);
            }
        };
        section("data_dir", old.data_dir != new.data_dir);
        section(
            "log",
            old.log != new.log || old.log_format != new.log_format,
        );
        section("worker_threads", old.worker_threads != new.worker_threads);
        section("listen", old.listen != new.listen);
        section("tls", old.tls != new.tls);
        section("broker", old.broker != new.broker);
        section("dedup", old.dedup != new.dedup);
        section("limits", old.limits != new.limits);
        section("metrics", old.metrics != new.metrics);
        Self {
            sites,
            routes,
            pushes,
            restart,
        }
    }

    /// Whether nothing changes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
            && self.routes.is_empty()
            && self.pushes.is_empty()
            && self.restart.is_empty()
    }
}

/// `(site, version)` of every site's effective config, or nothing for an invalid config.
fn versions(config: &HubConfig) -> Vec<(String, u64)> {
    let Ok(table) = RouteTable::new(config) else {
        return Vec::new();
    };
    table
        .sites()
        .iter()
        .filter_map(|s| EffectiveConfig::for_site(&table, &s.name))
        .map(|e| (e.site.clone(), e.to_push().version))
        .collect()
}

fn named_changes<T>(
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &String,
    fields: impl Fn(&T, &T) -> Vec<&'static str>,
) -> Vec<NamedChange> {
    let mut out = Vec::new();
    for item in new {
        let change = match old.iter().find(|o| name(o) == name(item)) {
            None => Change::Added,
            Some(before) => {
                let changed = fields(before, item);
                if changed.is_empty() {
                    continue;
                }
                Change::Altered(changed)
            }
        };
        out.push(NamedChange {
            name: name(item).clone(),
            change,
        });
    }
    for item in old {
        if !new.iter().any(|n| name(n) == name(item)) {
            out.push(NamedChange {
                name: name(item).clone(),
                change: Change::Removed,
            });
        }
    }
    out
}

fn route_fields(a: &RouteConfig, b: &RouteConfig) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut field = |name, changed: bool| {
        if changed {
            fields.push(name);
        }
    };
    field("kind", a.kind != b.kind);
    field("from", a.from != b.from);
    field("to", a.to != b.to);
    field("filter", a.filter != b.filter);
    field("topic", a.topic != b.topic);
    field("qos", a.qos != b.qos);
    field("retain", a.retain != b.retain);
    field("priority", a.priority != b.priority);
    field("ttl", a.ttl != b.ttl);
    field("dedup", a.dedup != b.dedup);
    fields
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Added => f.write_str("added"),
            Self::Removed => f.write_str("removed"),
            Self::Altered(fields) => write!(f, "changed: {}", fields.join(", ")),
        }
    }
}

impl fmt::Display for HubConfigDiff {
    /// One line per change, prefixed `+` (added), `-` (removed) or `~` (changed), by section:
    ///
    /// ```text
    /// sites:
    ///   + line3 added
    /// routes:
    ///   ~ telemetry changed: qos, retain
    /// pushes (new effective config, applied live):
    ///   ~ line1 0123456789abcdef -> fedcba9876543210
    ///   + line3 (none) -> 0011223344556677
    /// restart needed for: listen
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        let sign = |c: &Change| match c {
            Change::Added => '+',
            Change::Removed => '-',
            Change::Altered(_) => '~',
        };
        for (title, list) in [("sites", &self.sites), ("routes", &self.routes)] {
            if !list.is_empty() {
                writeln!(f, "{title}:")?;
                for c in list {
                    writeln!(f, "  {} {} {}", sign(&c.change), c.name, c.change)?;
                }
            }
        }
        if !self.pushes.is_empty() {
            writeln!(f, "pushes (new effective config, applied live):")?;
            for p in &self.pushes {
                let v =
                    |v: Option<u64>| v.map_or_else(|| "(none)".to_owned(), |v| format!("{v:016x}"));
                let s = match (p.old, p.new) {
                    (None, _) => '+',
                    (_, None) => '-',
                    _ => '~',
                };
                writeln!(f, "  {s} {} {} -> {}", p.site, v(p.old), v(p.new))?;
            }
        }
        if !self.restart.is_empty() {
            writeln!(f, "restart needed for: {}", self.restart.join(", "))?;
        }
        Ok(())
    }
}
