//! Loading: TOML file (or text) → figment extraction with `MESHBRIDGE_` environment overrides → path
//! resolution and defaults → `validate()`.
//!
//! figment reports only the first extraction error (an unknown key, a wrong type, a bad value), so the loader
//! takes the offending key out and extracts again until nothing is left to report (`extract_all`); what
//! extracts is then checked by `validate()`. One run lists every mistake of a file, each with its key path,
//! except after a TOML syntax error, which leaves no tree to go on with.

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
    "worker_threads",
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
    "worker_threads",
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
    #[error("invalid config {source_name}: {} problem(s)\n  {}{}", error.count() + problems.len(), FigmentErrors(error), ProblemTail(problems))]
    Parse {
        /// Where the config came from.
        source_name: ConfigSource,
        /// figment's errors (one or more, chained), each naming its key and provider (file or environment
        /// variable).
        #[source]
        error: Box<figment::Error>,
        /// What the rules found in the rest of the config (keys the errors name are left out).
        problems: Vec<FieldError>,
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
                write!(f, "{}: ", key_of(&error))?;
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

/// Problems listed after figment's errors, each on its own line.
struct ProblemTail<'a>(&'a [FieldError]);

impl fmt::Display for ProblemTail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in self.0 {
            write!(f, "\n  {error}")?;
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
    let (config, errors) = extract_all::<T>(&figment);
    let parse_error = |error: figment::Error, problems: Vec<FieldError>| ConfigError::Parse {
        source_name: source_name.clone(),
        error: Box::new(error),
        problems,
    };
    let Some(mut config) = config else {
        let error = chained(errors).expect("invariant: no config comes with at least one error");
        return Err(parse_error(error, Vec::new()));
    };
    config.normalize(base);
    let problems = config.check().err().unwrap_or_default();
    match chained(errors) {
        None if problems.is_empty() => Ok(config),
        None => Err(ConfigError::Invalid {
            source_name,
            errors: problems,
        }),
        Some(error) => {
            // The rules run on what was left once the bad keys were taken out; a problem under a key
            // already reported (or stood in for) says nothing new.
            let reported: Vec<String> = error.clone().into_iter().map(|e| key_of(&e)).collect();
            let problems = problems
                .into_iter()
                .filter(|p| !reported.iter().any(|r| is_under(&p.key, r)))
                .collect();
            Err(parse_error(error, problems))
        }
    }
}

/// One figment error holding `errors`, which iterates them in order.
fn chained(errors: Vec<figment::Error>) -> Option<figment::Error> {
    errors.into_iter().rev().reduce(figment::Error::chain)
}

/// How many extraction errors one load reports at most (each costs one more extraction).
const MAX_EXTRACTION_ERRORS: usize = 64;

/// Extracts `T`, collecting every extraction error rather than the first one only: figment (serde) stops at
/// the first unknown key, wrong type or bad value, so after each the offending key is taken out of the tree
/// and extraction runs again. A key that must be there (missing, or required and taken out) gets a stand-in
/// value, trying one type after another until one extracts, so the keys after it are still checked; a
/// stand-in is never used, because any error fails the load. Returns the config extracted from what was
/// left (for the semantic checks), if any, and the errors, each with the metadata of the provider (file or
/// environment variable) its key came from.
fn extract_all<T: DeserializeOwned>(figment: &Figment) -> (Option<T>, Vec<figment::Error>) {
    use figment::error::Kind;
    use figment::value::Dict;
    use figment::Provider;

    let mut tree: Dict = match figment.data() {
        Ok(mut profiles) => profiles
            .remove(&figment::Profile::Default)
            .unwrap_or_default(),
        // Not TOML at all: there is no tree to go on with.
        Err(error) => return (None, vec![error]),
    };
    let mut errors: Vec<figment::Error> = Vec::new();
    // Every key reported so far, with the stand-in in use for it (if any).
    let mut reported: Vec<(Vec<String>, Option<usize>)> = Vec::new();
    for _ in 0..MAX_EXTRACTION_ERRORS * (STAND_INS + 1) {
        let attempt = Figment::from(figment::providers::Serialized::defaults(&tree)).extract::<T>();
        let mut error = match attempt {
            Ok(config) => return (Some(config), errors),
            Err(error) => error
                .into_iter()
                .next()
                .expect("an error holds one at least"),
        };
        let mut path = error.path.clone();
        let missing = match &error.kind {
            Kind::MissingField(field) => {
                path.push(field.to_string());
                true
            }
            // serde names an unknown key in the error, figment the table it is in.
            Kind::UnknownField(field, _) if path.last() != Some(field) => {
                path.push(field.clone());
                false
            }
            _ => false,
        };
        if !missing {
            narrow::<T>(&tree, &mut path, &error.kind);
        }
        // An error at or under a key reported already: that key went missing when taken out, or its
        // stand-in has the wrong type (or lacks what its type requires).
        if let Some(slot) = reported
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| path.starts_with(p))
            .max_by_key(|(_, (p, _))| p.len())
            .map(|(i, _)| i)
        {
            let (at, stand_in_in_use) = &mut reported[slot];
            let next = stand_in_in_use.map_or(0, |i| i + 1);
            let Some(value) = stand_in(next) else {
                return (None, errors);
            };
            *stand_in_in_use = Some(next);
            if !set(&mut tree, at, value) {
                return (None, errors);
            }
            continue;
        }
        // Reported with the provider its key came from (the rebuilt tree has lost that), and the value.
        error.metadata = figment.find_metadata(&path.join(".")).cloned();
        if let (Some(text), Kind::Message(_) | Kind::InvalidValue(..)) =
            (lookup(&tree, &path).and_then(scalar_text), &error.kind)
        {
            error.kind = Kind::Message(format!("{} (value: {text})", error.kind));
        }
        if !missing {
            error.path.clone_from(&path);
        }
        errors.push(error);
        if errors.len() >= MAX_EXTRACTION_ERRORS || path.is_empty() {
            return (None, errors);
        }
        let is_element = path.last().is_some_and(|k| k.parse::<usize>().is_ok());
        if missing || is_element {
            // An array element is replaced rather than removed, so later elements keep their index.
            reported.push((path.clone(), Some(0)));
            if !set(&mut tree, &path, stand_in(0).expect("a first stand-in")) {
                return (None, errors);
            }
        } else {
            reported.push((path.clone(), None));
            if !remove(&mut tree, &path) {
                return (None, errors);
            }
        }
    }
    (None, errors)
}

/// Narrows an error reported at a table to the key inside it that causes it: serde loses the key within
/// internally tagged enums such as `[broker]` (`kind = "embedded"`), so figment names `broker` for a bad
/// `broker.listen`. The key is found by taking the table's keys out one at a time until the error changes.
fn narrow<T: DeserializeOwned>(
    tree: &figment::value::Dict,
    path: &mut Vec<String>,
    kind: &figment::error::Kind,
) {
    use figment::error::Kind;
    use figment::value::Value;
    if !matches!(
        kind,
        Kind::Message(_) | Kind::InvalidValue(..) | Kind::InvalidType(..)
    ) {
        return;
    }
    let before = kind.to_string();
    while let Some(Value::Dict(_, children)) = lookup(tree, path) {
        // Taking the culprit out makes the error go away (or become another); taking out a required key
        // (the enum's tag, say) only says that key is missing, which is weaker evidence.
        let mut strong = None;
        let mut weak = Vec::new();
        for key in children.keys().take(64) {
            let mut trial = tree.clone();
            let mut at = path.clone();
            at.push(key.clone());
            remove(&mut trial, &at);
            match Figment::from(figment::providers::Serialized::defaults(&trial)).extract::<T>() {
                Ok(_) => strong = Some(key),
                Err(e) => match e.into_iter().next().map(|e| e.kind) {
                    Some(Kind::MissingField(field)) if field == key.as_str() => weak.push(key),
                    Some(other) if other.to_string() != before => strong = Some(key),
                    _ => {}
                },
            }
            if strong.is_some() {
                break;
            }
        }
        let culprit = strong.or(if weak.len() == 1 { weak.pop() } else { None });
        match culprit {
            Some(key) => path.push(key.clone()),
            None => break,
        }
    }
}

/// How many stand-in types [`stand_in`] has.
const STAND_INS: usize = 5;

/// The stand-in values tried in turn for a key that must be there.
fn stand_in(i: usize) -> Option<figment::value::Value> {
    use figment::value::{Dict, Value};
    Some(match i {
        0 => Value::from(String::new()),
        1 => Value::from(0u64),
        2 => Value::from(false),
        3 => Value::from(Dict::new()),
        4 => Value::from(Vec::<Value>::new()),
        _ => return None,
    })
}

/// The value at `path` (keys, and indices into arrays).
fn lookup<'a>(
    tree: &'a figment::value::Dict,
    path: &[String],
) -> Option<&'a figment::value::Value> {
    use figment::value::Value;
    let (first, rest) = path.split_first()?;
    let mut value = tree.get(first)?;
    for key in rest {
        value = match value {
            Value::Dict(_, dict) => dict.get(key)?,
            Value::Array(_, items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Sets the value at `path`, creating missing tables on the way; false when the path crosses a value
/// that is not a table or array.
fn set(tree: &mut figment::value::Dict, path: &[String], value: figment::value::Value) -> bool {
    use figment::value::{Dict, Value};
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut dict = tree;
    let mut parents = parents.iter().peekable();
    while let Some(key) = parents.next() {
        let entry = dict
            .entry(key.clone())
            .or_insert_with(|| Value::from(Dict::new()));
        match entry {
            Value::Dict(_, inner) => dict = inner,
            Value::Array(_, items) => {
                // An index: step into that element, which must itself be a table (or be the target).
                let Some(index) = parents.next().and_then(|k| k.parse::<usize>().ok()) else {
                    return false;
                };
                let Some(element) = items.get_mut(index) else {
                    return false;
                };
                match element {
                    Value::Dict(_, inner) => dict = inner,
                    _ => return false,
                }
            }
            _ => return false,
        }
    }
    dict.insert(last.clone(), value);
    true
}

/// Removes the key at `path`; false when there is none.
fn remove(tree: &mut figment::value::Dict, path: &[String]) -> bool {
    use figment::value::Value;
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    if parents.is_empty() {
        return tree.remove(last).is_some();
    }
    let mut dict = tree;
    let mut parents = parents.iter().peekable();
    while let Some(key) = parents.next() {
        let Some(entry) = dict.get_mut(key) else {
            return false;
        };
        match entry {
            Value::Dict(_, inner) => dict = inner,
            Value::Array(_, items) => {
                let Some(index) = parents.next().and_then(|k| k.parse::<usize>().ok()) else {
                    return false;
                };
                match items.get_mut(index) {
                    Some(Value::Dict(_, inner)) => dict = inner,
                    _ => return false,
                }
            }
            _ => return false,
        }
    }
    dict.remove(last).is_some()
}

/// A scalar as written in TOML (strings quoted); `None` for tables and arrays.
fn scalar_text(value: &figment::value::Value) -> Option<String> {
    use figment::value::Value;
    match value {
        Value::String(_, s) => Some(format!("{s:?}")),
        Value::Char(_, c) => Some(format!("{:?}", c.to_string())),
        Value::Bool(_, b) => Some(b.to_string()),
        Value::Num(_, n) => n
            .to_u128()
            .map(|v| v.to_string())
            .or_else(|| n.to_i128().map(|v| v.to_string()))
            .or_else(|| n.to_f64().map(|v| v.to_string())),
        Value::Empty(..) | Value::Dict(..) | Value::Array(..) => None,
    }
}

/// A figment error's key in [`FieldError`]'s style: `routes[2].filter`.
fn key_of(error: &figment::Error) -> String {
    let mut key = String::new();
    for segment in &error.path {
        if segment.parse::<usize>().is_ok() {
            key.push_str(&format!("[{segment}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    key
}

/// Whether `key` is `parent` or lies under it.
fn is_under(key: &str, parent: &str) -> bool {
    parent.is_empty()
        || key == parent
        || key
            .strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
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
