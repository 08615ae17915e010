//! Loading: TOML file (or text) → figment extraction with `MESHBRIDGE_` environment overrides → path
//! resolution and defaults → `validate()`.
//!
//! figment reports only the first extraction error (a syntax error, an unknown key, a wrong type); everything
//! that extracts is then checked by `validate()`, which reports every problem at once.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;

use super::validate::FieldError;

/// The prefix both programs used to share, still read (with a deprecation warning) for the keys of each
/// program: `MESHBRIDGE_UPLINK__WINDOW=16` still sets the agent's `uplink.window`. The hub ignores such a
/// variable for a key only the agent has (and the other way round), so one environment can serve both; a
/// key neither program has is refused as before, so a typo is not silently ignored.
pub const ENV_PREFIX: &str = "MESHBRIDGE_";

/// The agent's own prefix: `MESHBRIDGE_AGENT_UPLINK__WINDOW=16` sets `uplink.window`. It wins over the
/// shared one. (`MESHBRIDGE_AGENT_NAME` keeps its old meaning, `agent_name`.)
pub const AGENT_ENV_PREFIX: &str = "MESHBRIDGE_AGENT_";

/// The hub's own prefix: `MESHBRIDGE_HUB_LISTEN__MAX_CONNECTIONS=64` sets `listen.max_connections`.
pub const HUB_ENV_PREFIX: &str = "MESHBRIDGE_HUB_";

/// Top-level keys of the agent's config (checked against the model by a test).
pub(crate) const AGENT_KEYS: &[&str] = &[
    "site",
    "agent_name",
    "data_dir",
    "log",
    "log_format",
    "broker",
    "uplink",
    "queue",
    "metrics",
    "status",
    "routes",
];

/// Top-level keys of the hub's config (checked against the model by a test).
pub(crate) const HUB_KEYS: &[&str] = &[
    "data_dir",
    "log",
    "log_format",
    "listen",
    "tls",
    "broker",
    "dedup",
    "limits",
    "sites",
    "routes",
    "downlink",
    "metrics",
    "status",
];

/// Which program's environment: its own prefix and keys, and the other program's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `edge-agent`.
    Agent,
    /// `cloud-hub`.
    Hub,
}

impl Program {
    const fn prefix(self) -> &'static str {
        match self {
            Self::Agent => AGENT_ENV_PREFIX,
            Self::Hub => HUB_ENV_PREFIX,
        }
    }

    const fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Agent => AGENT_KEYS,
            Self::Hub => HUB_KEYS,
        }
    }

    const fn other_keys(self) -> &'static [&'static str] {
        match self {
            Self::Agent => HUB_KEYS,
            Self::Hub => AGENT_KEYS,
        }
    }

    /// Whether the variable `MESHBRIDGE_<rest>` (shared prefix) is read by this program: a key of its
    /// own, or a key of neither program (refused then as unknown, naming the variable). Variables of the
    /// programs' own prefixes and the other program's keys are left alone.
    fn reads_shared(self, rest: &str) -> bool {
        let rest = rest.to_ascii_lowercase();
        let first = rest.split(ENV_SPLIT).next().unwrap_or_default();
        if self.keys().contains(&first) {
            return true;
        }
        let own = |p: &str| rest.starts_with(&p["MESHBRIDGE_".len()..].to_ascii_lowercase());
        !(own(AGENT_ENV_PREFIX) || own(HUB_ENV_PREFIX) || self.other_keys().contains(&first))
    }

    /// Whether `MESHBRIDGE_<own prefix><rest>` is read under the own prefix. Only the agent's
    /// `MESHBRIDGE_AGENT_NAME` is not: it is the shared-prefix name of `agent_name`.
    fn reads_own(self, rest: &str) -> bool {
        !(self == Self::Agent && rest.eq_ignore_ascii_case("NAME"))
    }
}

/// The deprecation warnings for `vars` (the process environment): one per shared-prefix variable this
/// program reads, naming its new name. The programs log them once logging is set up.
pub fn deprecated_env(program: Program, vars: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut notes: Vec<String> = vars
        .into_iter()
        .filter_map(|name| {
            let upper = name.to_ascii_uppercase();
            let rest = upper.strip_prefix(ENV_PREFIX)?;
            let first = rest.to_ascii_lowercase();
            let first = first.split(ENV_SPLIT).next().unwrap_or_default().to_owned();
            let is_own = upper.starts_with(program.prefix()) && program.reads_own(&upper[program.prefix().len()..]);
            (!is_own && program.keys().contains(&first.as_str())).then(|| {
                format!(
                    "environment variable {name} uses the shared MESHBRIDGE_ prefix, which is deprecated: name it {}{rest}",
                    program.prefix()
                )
            })
        })
        .collect();
    notes.sort();
    notes
}

/// Separator between nesting levels in environment variable names.
pub const ENV_SPLIT: &str = "__";

/// Where a config came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file on disk, by the path it was loaded from.
    File(PathBuf),
    /// TOML text handed over in memory (a config pushed by the hub).
    Text,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Text => f.write_str("<config text>"),
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be opened (missing, unreadable). Checked before parsing so that a wrong path
    /// is reported as such rather than as a confusing "missing field".
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or does not fit the model: an unknown key, a wrong type, a missing required
    /// field, a malformed duration or size. figment stops at the first such error; its message names the key.
    #[error("invalid config {source_name}: {}", FigmentErrors(error))]
    Parse {
        /// Where the config came from.
        source_name: ConfigSource,
        /// figment's error, naming the key and the provider (file or environment variable).
        #[source]
        error: Box<figment::Error>,
    },
    /// The config parsed but `validate()` found problems; all of them are listed, one per line.
    #[error("invalid config {source_name}: {} problem(s)\n{}", errors.len(), ProblemList(errors))]
    Invalid {
        /// Where the config came from.
        source_name: ConfigSource,
        /// Every problem found, each with its key path.
        errors: Vec<FieldError>,
    },
}

/// figment's errors in our key style: `uplink.window: invalid type ...`, naming the environment variable when
/// the bad value came from one (figment's own Display prefixes the profile, `default.uplink.window`, and shows
/// environment keys as `UPLINK.WINDOW`, neither of which an operator can search for).
struct FigmentErrors<'a>(&'a figment::Error);

impl fmt::Display for FigmentErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.clone().into_iter().enumerate() {
            if i > 0 {
                f.write_str("\n  ")?;
            }
            if !error.path.is_empty() {
                write!(f, "{}: ", error.path.join("."))?;
            }
            write!(f, "{}", error.kind)?;
            // figment names an environment provider "`PREFIX` environment variable(s)".
            let env_prefix = error
                .metadata
                .as_ref()
                .filter(|md| md.name.contains("environment"))
                .and_then(|md| md.name.split('`').nth(1).map(str::to_owned));
            if let Some(prefix) = env_prefix {
                let name: Vec<String> = error.path.iter().map(|k| k.to_ascii_uppercase()).collect();
                write!(
                    f,
                    " (from environment variable {prefix}{})",
                    name.join(ENV_SPLIT)
                )?;
            }
        }
        Ok(())
    }
}

struct ProblemList<'a>(&'a [FieldError]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {error}")?;
        }
        Ok(())
    }
}

/// What the generic loader needs from a config tree.
pub(crate) trait Model: DeserializeOwned {
    /// Whose environment overrides apply.
    const PROGRAM: Program;
    /// Makes relative paths absolute against `base` and fills defaults that depend on other fields.
    fn normalize(&mut self, base: &Path);
    /// Reports every problem.
    fn check(&self) -> Result<(), Vec<FieldError>>;
}

/// Loads a config file with environment overrides; see the module doc for the steps.
pub(crate) fn load_file<T: Model>(path: &Path) -> Result<T, ConfigError> {
    // Open it ourselves first: figment would report a missing file less directly.
    std::fs::File::open(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let absolute = std::path::absolute(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = absolute.parent().unwrap_or(Path::new("/"));
    let program = T::PROGRAM;
    let figment = Figment::new()
        .merge(Toml::file_exact(path))
        .merge(
            Env::prefixed(ENV_PREFIX)
                .filter(move |key| program.reads_shared(key.as_str()))
                .split(ENV_SPLIT),
        )
        .merge(
            Env::prefixed(program.prefix())
                .filter(move |key| program.reads_own(key.as_str()))
                .split(ENV_SPLIT),
        );
    finish(figment, base, ConfigSource::File(path.to_owned()))
}

/// Loads config text without environment overrides: pushed configs are applied exactly as sent, so that what
/// the hub validated is what runs.
pub(crate) fn load_text<T: Model>(text: &str, base: &Path) -> Result<T, ConfigError> {
    finish(
        Figment::new().merge(Toml::string(text)),
        base,
        ConfigSource::Text,
    )
}

fn finish<T: Model>(
    figment: Figment,
    base: &Path,
    source_name: ConfigSource,
) -> Result<T, ConfigError> {
    let mut config: T = figment.extract().map_err(|error| ConfigError::Parse {
        source_name: source_name.clone(),
        error: Box::new(error),
    })?;
    config.normalize(base);
    config.check().map_err(|errors| ConfigError::Invalid {
        source_name,
        errors,
    })?;
    Ok(config)
}

/// Makes `path` absolute against `base` if it is relative. Lexical only (no `canonicalize`): the file need not
/// exist yet, and symlinks are the operator's business. An empty path is left empty so that `validate()`
/// reports it instead of silently turning it into the config directory.
pub(crate) fn resolve(base: &Path, path: &mut PathBuf) {
    if path.is_relative() && !path.as_os_str().is_empty() {
        *path = base.join(&*path);
    }
}

/// Deserializers for string fields that accept numbers and booleans as their text.
///
/// figment parses environment values, so `MESHBRIDGE_SITE=42` arrives as the integer 42 and a plain `String`
/// field would refuse it. Fields an operator may plausibly override with a number-looking value (names,
/// usernames, passwords) go through these. A float is rendered by Rust's `Display` (`1e5` becomes `100000`),
/// so such values should be quoted in TOML instead.
pub(crate) mod lenient {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};

    struct TextVisitor;

    impl Visitor<'_> for TextVisitor {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }

    /// A `String` that may also be written as a number or boolean.
    pub(crate) fn string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }

    /// An `Option<String>` field (with `#[serde(default)]`) that may also be written as a number or boolean.
    pub(crate) fn opt_string<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<String>, D::Error> {
        string(deserializer).map(Some)
    }
}
