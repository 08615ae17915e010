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

/// Prefix of environment variables that override file values; `__` separates nesting levels, so
/// `MESHBRIDGE_UPLINK__WINDOW=16` sets `uplink.window`. Every variable with this prefix is read, so an unrelated
/// `MESHBRIDGE_*` variable is refused like any unknown key.
pub const ENV_PREFIX: &str = "MESHBRIDGE_";

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
            let from_env = error
                .metadata
                .as_ref()
                .is_some_and(|md| md.name.contains("environment"));
            if from_env {
                let name: Vec<String> = error.path.iter().map(|k| k.to_ascii_uppercase()).collect();
                write!(
                    f,
                    " (from environment variable {ENV_PREFIX}{})",
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
    let figment = Figment::new()
        .merge(Toml::file_exact(path))
        .merge(Env::prefixed(ENV_PREFIX).split(ENV_SPLIT));
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
