//! Checks of the reference against the model at run time, through serde itself rather than the sources:
//!
//! - sample documents built from the reference (every key, or only the required ones) deserialize;
//! - leaving out a key the reference calls required is refused, and a minimal document shows every default
//!   the reference states when it is serialized again (which also compares `Default` impls with the
//!   per-key defaults);
//! - an unknown key put into each table makes serde list that table's fields, which must be exactly the
//!   reference's keys: a field the generator missed fails here;
//! - the example configs load, every key they serialize to is in the reference, and every path is absolute.

use std::path::Path;

use toml::{Table as TomlTable, Value};

use super::render::env_var;
use super::schema::{DefaultValue, Kind, Program, Val};

/// Deserializes config text into the program's root type and serializes it back.
pub(crate) type RoundTrip = fn(&str) -> Result<TomlTable, String>;

pub(crate) fn round_trip<T>(text: &str) -> Result<TomlTable, String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let config: T = toml::from_str(text).map_err(|e| e.to_string())?;
    let text = toml::to_string(&config).map_err(|e| format!("serialize: {e}"))?;
    toml::from_str(&text).map_err(|e| format!("reparse: {e}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every key.
    Full,
    /// Only required keys; optional tables left out.
    Minimal,
    /// Required keys, and every optional table with its required keys.
    MinimalTables,
}

/// One step into a document: a key or an array index.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn sample(kind: &Kind) -> Value {
    if let Some(example) = kind.example() {
        return Value::String(example.to_owned());
    }
    match kind {
        Kind::Str => Value::String("sample".into()),
        Kind::Secret => Value::String("secret".into()),
        Kind::Bool => Value::Boolean(true),
        Kind::Int => Value::Integer(1),
        Kind::Path => Value::String("certs/sample.pem".into()),
        Kind::Enum(values) => Value::String(values[0].value.clone()),
        Kind::Sites => Value::String("*".into()),
        Kind::Array(inner) => Value::Array(vec![sample(inner)]),
        Kind::Tag(value) => Value::String(value.clone()),
        _ => unreachable!("tables have no sample scalar"),
    }
}

fn build(program: &Program, t: usize, mode: Mode, choice: usize) -> TomlTable {
    let mut out = TomlTable::new();
    for key in &program.tables[t].keys {
        let is_table = matches!(
            key.kind,
            Kind::Table(_) | Kind::Tables(_) | Kind::Tagged(..)
        );
        let include = match mode {
            Mode::Full => true,
            Mode::Minimal => key.required(),
            Mode::MinimalTables => key.required() || is_table,
        };
        if !include {
            continue;
        }
        let value = match &key.kind {
            Kind::Table(c) => Value::Table(build(program, *c, mode, choice)),
            Kind::Tables(c) => Value::Array(vec![Value::Table(build(program, *c, mode, choice))]),
            Kind::Tagged(_, variants) => {
                let (_, c) = &variants[choice.min(variants.len() - 1)];
                Value::Table(build(program, *c, mode, choice))
            }
            kind => sample(kind),
        };
        out.insert(key.name.clone(), value);
    }
    out
}

/// How many documents cover every variant of every tagged table.
fn choices(program: &Program) -> usize {
    program
        .tables
        .iter()
        .flat_map(|t| &t.keys)
        .filter_map(|k| match &k.kind {
            Kind::Tagged(_, v) => Some(v.len()),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

/// Every table instance in `doc`: (table index, where it is).
fn instances(program: &Program, doc: &TomlTable) -> Vec<(usize, Vec<Seg>)> {
    fn visit(
        program: &Program,
        t: usize,
        value: &TomlTable,
        at: Vec<Seg>,
        out: &mut Vec<(usize, Vec<Seg>)>,
    ) {
        out.push((t, at.clone()));
        for key in &program.tables[t].keys {
            let Some(v) = value.get(&key.name) else {
                continue;
            };
            let mut here = at.clone();
            here.push(Seg::Key(key.name.clone()));
            match (&key.kind, v) {
                (Kind::Table(c), Value::Table(inner)) => visit(program, *c, inner, here, out),
                (Kind::Tables(c), Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Value::Table(inner) = item {
                            let mut at = here.clone();
                            at.push(Seg::Index(i));
                            visit(program, *c, inner, at, out);
                        }
                    }
                }
                (Kind::Tagged(tag, variants), Value::Table(inner)) => {
                    let kind = inner.get(tag).and_then(Value::as_str);
                    if let Some((_, c)) = variants.iter().find(|(v, _)| Some(v.as_str()) == kind) {
                        visit(program, *c, inner, here, out);
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    visit(program, 0, doc, Vec::new(), &mut out);
    out
}

fn table_at<'a>(doc: &'a mut TomlTable, at: &[Seg]) -> &'a mut TomlTable {
    find_table(doc, at).expect("instance path leads to a table")
}

fn find_table<'a>(doc: &'a mut TomlTable, at: &[Seg]) -> Option<&'a mut TomlTable> {
    let mut table = doc;
    let mut i = 0;
    while i < at.len() {
        let Seg::Key(key) = &at[i] else {
            unreachable!("an index follows a key")
        };
        table = match (table.get_mut(key)?, at.get(i + 1)) {
            (Value::Table(t), _) => t,
            (Value::Array(items), Some(Seg::Index(n))) => {
                i += 1;
                match items.get_mut(*n)? {
                    Value::Table(t) => t,
                    _ => return None,
                }
            }
            _ => return None,
        };
        i += 1;
    }
    Some(table)
}

fn show(at: &[Seg]) -> String {
    let mut s = String::new();
    for seg in at {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    if s.is_empty() {
        "<top level>".to_owned()
    } else {
        s
    }
}

/// Runs every model check of one program; returns the problems found.
pub(crate) fn model(program: &Program, parse: RoundTrip) -> Vec<String> {
    let mut problems = Vec::new();
    for choice in 0..choices(program) {
        for mode in [Mode::Full, Mode::Minimal, Mode::MinimalTables] {
            let doc = build(program, 0, mode, choice);
            let text = toml::to_string(&doc).expect("a sample document serializes");
            let parsed = match parse(&text) {
                Ok(parsed) => parsed,
                Err(e) => {
                    problems.push(format!(
                        "{}: a sample document built from the reference is refused: {e}\n{text}",
                        program.name
                    ));
                    continue;
                }
            };
            match mode {
                Mode::Full => probe_fields(program, &doc, parse, &mut problems),
                Mode::Minimal | Mode::MinimalTables => {
                    check_required(program, &doc, parse, &mut problems);
                    check_defaults(program, &doc, &parsed, &mut problems);
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    problems
}

/// Leaving out a required key must be refused.
fn check_required(
    program: &Program,
    doc: &TomlTable,
    parse: RoundTrip,
    problems: &mut Vec<String>,
) {
    for (t, at) in instances(program, doc) {
        for key in program.tables[t].keys.iter().filter(|k| k.required()) {
            let mut without = doc.clone();
            table_at(&mut without, &at).remove(&key.name);
            let text = toml::to_string(&without).expect("serializes");
            if parse(&text).is_ok() {
                problems.push(format!(
                    "{}: the reference calls `{}` in {} required, but the model accepts a document without it",
                    program.name,
                    key.name,
                    show(&at)
                ));
            }
        }
    }
}

/// An unknown key in each table makes serde list the table's fields; they must be the reference's keys.
fn probe_fields(program: &Program, doc: &TomlTable, parse: RoundTrip, problems: &mut Vec<String>) {
    const PROBE: &str = "zz_reference_probe";
    for (t, at) in instances(program, doc) {
        let mut probed = doc.clone();
        table_at(&mut probed, &at).insert(PROBE.into(), Value::Integer(0));
        let text = toml::to_string(&probed).expect("serializes");
        let error = match parse(&text) {
            Ok(_) => {
                problems.push(format!(
                    "{}: {} accepts an unknown key (no deny_unknown_fields?)",
                    program.name,
                    show(&at)
                ));
                continue;
            }
            Err(e) => e,
        };
        let marker = format!("unknown field `{PROBE}`");
        let Some(pos) = error.find(&marker) else {
            problems.push(format!(
                "{}: probing {} gave an unexpected error: {error}",
                program.name,
                show(&at)
            ));
            continue;
        };
        let line = error[pos + marker.len()..]
            .lines()
            .next()
            .unwrap_or_default();
        let mut model: Vec<&str> = line.split('`').skip(1).step_by(2).collect();
        model.sort_unstable();
        let mut reference: Vec<&str> = program.tables[t]
            .keys
            .iter()
            .filter(|k| !matches!(k.kind, Kind::Tag(_)))
            .map(|k| k.name.as_str())
            .collect();
        reference.sort_unstable();
        if model != reference {
            let missing: Vec<_> = model.iter().filter(|k| !reference.contains(k)).collect();
            let extra: Vec<_> = reference.iter().filter(|k| !model.contains(k)).collect();
            problems.push(format!(
                "{}: {} ({}): fields of the model missing from the reference: {missing:?}; keys of the reference not in the model: {extra:?}",
                program.name,
                show(&at),
                program.tables[t].rust_type
            ));
        }
    }
}

/// Every default the reference states is what the model fills in.
fn check_defaults(
    program: &Program,
    input: &TomlTable,
    parsed: &TomlTable,
    problems: &mut Vec<String>,
) {
    for (t, at) in instances(program, parsed) {
        let mut parsed = parsed.clone();
        let table = table_at(&mut parsed, &at).clone();
        let mut input = input.clone();
        let given = find_table(&mut input, &at).cloned().unwrap_or_default();
        for key in &program.tables[t].keys {
            if given.contains_key(&key.name) {
                continue;
            }
            let actual = table.get(&key.name);
            let ok = match (&key.default, actual) {
                (DefaultValue::Required, _) | (DefaultValue::Table, _) => true,
                (DefaultValue::Computed(_), _) => true,
                (DefaultValue::Unset, actual) => actual.is_none(),
                (DefaultValue::Empty, None) => true,
                (DefaultValue::Empty, Some(Value::Array(a))) => a.is_empty(),
                (DefaultValue::Empty, Some(_)) => false,
                (DefaultValue::Value(expected), Some(actual)) => same(expected, actual),
                (DefaultValue::Value(_), None) => false,
            };
            if !ok {
                let stated = match &key.default {
                    DefaultValue::Value(v) => v.toml(),
                    DefaultValue::Unset => "unset".into(),
                    _ => "none".into(),
                };
                problems.push(format!(
                    "{}: {}.{}: the reference states the default {stated}, the model fills in {actual:?}",
                    program.name,
                    show(&at),
                    key.name
                ));
            }
        }
    }
}

fn same(expected: &Val, actual: &Value) -> bool {
    use shared::config::ByteSize;
    match (expected, actual) {
        (Val::Int(n), Value::Integer(a)) => u128::try_from(*a).ok() == Some(*n),
        (Val::Bool(b), Value::Boolean(a)) => a == b,
        (Val::Str(s) | Val::Enum(s), Value::String(a)) => a == s,
        (Val::Addr(s), Value::String(a)) => {
            a.parse::<std::net::SocketAddr>().ok() == s.parse().ok()
        }
        (Val::Duration(d), Value::String(a)) => {
            humantime_serde::re::humantime::parse_duration(a).ok() == Some(*d)
        }
        (Val::Size(n), Value::String(a)) => a.parse::<ByteSize>().ok() == Some(ByteSize(*n)),
        (Val::Size(n), Value::Integer(a)) => u64::try_from(*a).ok() == Some(*n),
        _ => false,
    }
}

/// The example configs load (without environment overrides), every key they serialize to is one the
/// reference lists, and every path in them is resolved to an absolute one.
pub(crate) fn example(
    program: &Program,
    path: &Path,
    load: fn(&str, &Path) -> Result<TomlTable, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let text = std::fs::read_to_string(path).expect("read an example config");
    let base = path.parent().expect("a file has a directory");
    let doc = match load(&text, base) {
        Ok(doc) => doc,
        Err(e) => return vec![format!("{}: does not load: {e}", path.display())],
    };
    let found = instances(program, &doc);
    for (t, at) in &found {
        let mut doc = doc.clone();
        let table = table_at(&mut doc, at).clone();
        let keys = &program.tables[*t].keys;
        for (name, value) in &table {
            match keys.iter().find(|k| &k.name == name) {
                None => problems.push(format!(
                    "{}: key {}.{name} is not in the reference",
                    path.display(),
                    show(at)
                )),
                Some(key) if matches!(key.kind, Kind::Path) => {
                    if !value.as_str().is_some_and(|p| Path::new(p).is_absolute()) {
                        problems.push(format!(
                            "{}: {}.{name} is a path the reference says is relative to the config file, but it was not resolved: {value}",
                            path.display(),
                            show(at)
                        ));
                    }
                }
                Some(_) => {}
            }
        }
    }
    problems
}

/// Every environment variable the reference names for a table present in `config` sets that key: given a
/// value of the wrong type, loading fails and names the variable.
pub(crate) fn environment(
    program: &Program,
    config: &Path,
    load: fn(&Path) -> Result<(), String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let text = std::fs::read_to_string(config).expect("read an example config");
    let doc: TomlTable = toml::from_str(&text).expect("an example config is TOML");
    for (t, _) in instances(program, &doc) {
        let table = &program.tables[t];
        for key in &table.keys {
            let Some(var) = env_var(program, table, key) else {
                continue;
            };
            let mut path = table.path.clone();
            path.push(key.name.clone());
            // FigmentErrors in load.rs writes "<key path>: <problem> (from environment variable <name>)".
            let expected = format!("{}: ", path.join("."));
            std::env::set_var(&var, "[1, 2]");
            let result = load(config);
            std::env::remove_var(&var);
            match result {
                Ok(()) => problems.push(format!(
                    "{}: {var}=[1, 2] was accepted: the variable does not set `{}`",
                    program.name, key.name
                )),
                Err(e)
                    if !e.contains(&var)
                        || !e.contains(&expected)
                        || e.contains("unknown field") =>
                {
                    problems.push(format!(
                        "{}: {var}=[1, 2] did not fail as a bad value of `{}`: {e}",
                        program.name,
                        path.join(".")
                    ));
                }
                Err(_) => {}
            }
        }
    }
    problems
}
