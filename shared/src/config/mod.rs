//! The config model of both programs: one serde type tree per program, loading, and `validate()`.
//!
//! # Loading
//! [`load_agent`] and [`load_hub`] read a TOML file, apply environment overrides (`MESHBRIDGE_AGENT_*` and
//! `MESHBRIDGE_HUB_*`, and the deprecated shared `MESHBRIDGE_*` for each program's own keys; see
//! [`ENV_PREFIX`]), resolve relative paths against the file's directory,
//! fill defaults and validate. [`AgentConfig::from_toml_str`] and [`HubConfig::from_toml_str`] do the same for
//! text without environment overrides.
//!
//! # Routes and what the hub pushes
//! Routes are declared once in the hub's config ([`RouteConfig`], `[[routes]]`, with the TOML shape in its
//! module docs) and compiled into a [`RouteTable`](crate::policy::route::RouteTable). Each site's share is an
//! [`EffectiveConfig`]: a small TOML document with a content-derived version, pushed in `ConfigPush` and
//! parsed on the agent by [`EffectiveConfig::from_toml_str`]. [`HubConfigDiff`] lists what a new hub config
//! changes (sites, routes, which agents get a new push).
//!
//! # Conventions
//! - Every struct refuses unknown keys (`deny_unknown_fields`), so a typo is an error naming the key rather
//!   than a silently ignored setting.
//! - Durations are humantime strings (`"150ms"`, `"30s"`, `"7d"`); byte sizes are integers or strings with a
//!   unit (`"64MiB"`, see [`ByteSize`]).
//! - Variants are closed enums tagged by `kind` (`broker.kind = "embedded" | "external"`).
//! - `validate()` returns every problem with its key path, not just the first; figment's own errors (syntax,
//!   types, unknown keys) stop at the first, so a file may need two rounds of fixes.
//!
//! # Not here yet
//! Topic filters and namespace templates are kept as `String` and checked by a minimal grammar
//! ([`check_topic_filter`], [`check_namespace_template`], [`expand_namespace`]) until `shared::topic` provides
//! the real `TopicFilter`/`Namespace` types; those functions are where its parsers should be plugged in.

mod agent;
mod broker;
mod diff;
mod effective;
mod hub;
mod load;
mod print;
mod route;
mod units;
mod validate;

pub use agent::{
    load_agent, AgentConfig, FullPolicy, QueueConfig, Route, UplinkConfig, FRAME_OVERHEAD,
};
pub use broker::{
    BrokerConfig, BrokerListener, ClientTls, EmbeddedBroker, ExternalBroker, LogFormat,
    MetricsConfig, ServerTls, StatusConfig,
};
pub use diff::{Change, HubConfigDiff, NamedChange, VersionChange};
pub use effective::{version_of, Accept, Capture, EffectiveConfig, PushedConfig, EFFECTIVE_FORMAT};
pub use hub::{
    load_hub, DedupConfig, DownlinkConfig, HubConfig, HubTls, LimitsConfig, ListenConfig,
    SiteConfig,
};
pub use load::{
    deprecated_env, ConfigError, ConfigSource, Program, AGENT_ENV_PREFIX, ENV_PREFIX, ENV_SPLIT,
    HUB_ENV_PREFIX,
};
pub use print::{redacted_toml, PrintError, REDACTED};
pub(crate) use route::compile;
pub use route::{
    DedupKeyKind, RetainHandling, RouteConfig, RouteDedupConfig, RouteKind, SiteSelector,
    MAX_DEDUP_KEYS, MAX_DEDUP_WINDOW, MAX_PRIORITY, MAX_TTL, MIN_TTL,
};
pub use units::{ByteSize, ByteSizeError, HostPort, HostPortError, Secret};
pub use validate::{
    check_namespace_template, check_site_name, check_topic_filter, expand_namespace, FieldError,
    Problem, TopicTextError, SITE_PLACEHOLDER,
};

#[cfg(test)]
mod route_tests;
#[cfg(test)]
mod tests;
