//! Markdown for `docs/config-reference.md`.

use std::fmt::Write as _;

use super::schema::{DefaultValue, Key, Kind, Presence, Program, Sources, Table};

const INTRO: &str = r#"# Configuration reference

<!-- Generated from the doc comments of shared/src/config/ by shared/tests/config_reference.rs; do not edit.
     Update: UPDATE_CONFIG_REFERENCE=1 cargo test -p shared --test config_reference -->

Every key of the two programs' TOML config files, generated from the config model's doc comments in
`shared/src/config/` (a test fails when this file and the model disagree).

- **Where configs live.** Each program reads one TOML file given with `--config`: packaged installs use
  `/etc/meshbridge/agent.toml` and `/etc/meshbridge/hub.toml`; `configs/` in the repository holds runnable
  examples. `edge-agent --config FILE check-config` and `cloud-hub check-config --config FILE` check a file
  (with environment overrides) and list every problem; `print-config` prints the effective config with
  defaults filled in and passwords redacted.
- **Unknown keys are errors**, so a misspelt key is reported rather than ignored.
- **Relative paths** are resolved against the directory of the config file, not the working directory.
- **Durations** are humantime strings: `"150ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`.
- **Sizes** are a number of bytes (`1048576`) or a string with a unit: binary `KiB`, `MiB`, `GiB`, `TiB`
  (powers of 1024) or decimal `KB`, `MB`, `GB`, `TB` (powers of 1000), e.g. `"64MiB"`, `"1.5GiB"`.
- **Environment overrides.** A variable `MESHBRIDGE_AGENT_<KEY>` (edge-agent) or `MESHBRIDGE_HUB_<KEY>`
  (cloud-hub) overrides a key of the file, with `__` between table levels: `MESHBRIDGE_AGENT_UPLINK__WINDOW=16`
  sets `window` in `[uplink]`. The value is read like a TOML value (`16`, `true`, `"30s"` or `30s`). Keys inside
  arrays of tables (`[[routes]]`, `[[sites]]`, `[[broker.listeners]]`) have no variable of their own. The
  older shared prefix (`MESHBRIDGE_UPLINK__WINDOW`) still works for a program's own keys, with a deprecation
  warning.
- **Defaults** are what a key is when it is left out; "unset" means the feature it configures is off or takes
  the behaviour its description gives for "unset".
"#;

/// The whole reference.
pub(crate) fn reference(sources: &Sources, programs: &[Program]) -> String {
    let mut out = String::from(INTRO);
    for program in programs {
        render_program(&mut out, sources, program);
    }
    out
}

fn render_program(out: &mut String, sources: &Sources, program: &Program) {
    let _ = write!(out, "\n## {}\n", program.name);
    for (i, table) in program.tables.iter().enumerate() {
        let _ = write!(out, "\n### {}\n\n", heading(program, i));
        let presence = match (table.presence, table.array) {
            (Presence::Root, _) => None,
            (Presence::Required, false) => Some("Required."),
            (Presence::Required, true) => Some("Required: one such block per element."),
            (Presence::Defaulted, _) => {
                Some("Optional: when left out, every key takes its default.")
            }
            (Presence::Optional, false) => Some("Optional."),
            (Presence::Optional, true) => {
                Some("Optional: one such block per element, none when left out.")
            }
        };
        let mut intro: Vec<String> = table.doc.iter().map(|p| clean_doc(sources, p)).collect();
        if let Some(p) = presence {
            intro.push(p.to_owned());
        }
        let _ = write!(out, "{}\n\n", intro.join("\n\n"));
        out.push_str("| Key | Type | Default | Environment variable |\n|---|---|---|---|\n");
        for key in &table.keys {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                key.name,
                cell(&type_text(program, key)),
                cell(&default_text(key)),
                cell(&env_text(program, table, key)),
            );
        }
        out.push('\n');
        for key in &table.keys {
            render_key(out, sources, program, key);
        }
    }
}

fn render_key(out: &mut String, sources: &Sources, program: &Program, key: &Key) {
    let mut paragraphs: Vec<String> = key.doc.iter().map(|p| clean_doc(sources, p)).collect();
    match &key.kind {
        Kind::Tag(value) => paragraphs.push(format!("`{value:?}` selects the keys of this table.")),
        Kind::Table(t) | Kind::Tables(t) => {
            paragraphs.push(format!("See {}.", table_name(&program.tables[*t])));
        }
        Kind::Tagged(tag, variants) => {
            let names: Vec<String> = variants
                .iter()
                .map(|(value, _)| format!("`{tag} = {value:?}`"))
                .collect();
            paragraphs.push(format!("See the sections for {}.", names.join(" and ")));
        }
        _ => {}
    }
    if paragraphs.is_empty() {
        paragraphs.push("(No doc comment.)".to_owned());
    }
    let _ = writeln!(out, "- **`{}`**: {}", key.name, paragraphs.join("\n\n  "));
    if let Kind::Enum(values) = &key.kind {
        for v in values {
            let aliases = if v.aliases.is_empty() {
                String::new()
            } else {
                let a: Vec<String> = v.aliases.iter().map(|a| format!("`{a:?}`")).collect();
                format!(" (also {})", a.join(", "))
            };
            let doc: Vec<String> = v.doc.iter().map(|p| clean_doc(sources, p)).collect();
            let _ = writeln!(out, "  - `{:?}`{aliases}: {}", v.value, doc.join(" "));
        }
    }
}

/// `[uplink]`, `[[routes]]`, the top level.
fn table_name(table: &Table) -> String {
    if table.path.is_empty() {
        return "the top-level keys".to_owned();
    }
    let path = table.path.join(".");
    if table.array {
        format!("`[[{path}]]`")
    } else {
        format!("`[{path}]`")
    }
}

/// The section heading: the table's name, and the `kind` it belongs to when it is (inside) a variant.
fn heading(program: &Program, index: usize) -> String {
    let table = &program.tables[index];
    if table.path.is_empty() {
        return "Top-level keys".to_owned();
    }
    let mut name = table_name(table);
    if let Some((tag, value)) = &table.variant {
        let _ = write!(name, " with `{tag} = {value:?}`");
    } else if let Some((tag, value, at)) = enclosing_variant(program, index) {
        let _ = write!(name, " (in `[{at}]` with `{tag} = {value:?}`)");
    }
    name
}

/// The nearest variant table this one is nested in: tables are in depth-first order, so it is the last
/// variant table before this one whose path is a prefix of this one's.
fn enclosing_variant(program: &Program, index: usize) -> Option<(String, String, String)> {
    let path = &program.tables[index].path;
    program.tables[..index].iter().rev().find_map(|t| {
        let (tag, value) = t.variant.as_ref()?;
        (t.path.len() < path.len() && path.starts_with(&t.path))
            .then(|| (tag.clone(), value.clone(), t.path.join(".")))
    })
}

pub(crate) fn type_text(program: &Program, key: &Key) -> String {
    kind_text(program, &key.kind)
}

fn kind_text(program: &Program, kind: &Kind) -> String {
    let example = |what: &str| format!("{what}, e.g. `\"{}\"`", kind.example().unwrap_or_default());
    match kind {
        Kind::Str => "string".to_owned(),
        Kind::Secret => "string (secret)".to_owned(),
        Kind::Bool => "bool".to_owned(),
        Kind::Int => "integer".to_owned(),
        Kind::Duration => example("duration"),
        Kind::Size => example("size"),
        Kind::HostPort => example("host:port"),
        Kind::SocketAddr => example("IP address:port"),
        Kind::Path => "path (relative to the config file)".to_owned(),
        Kind::Enum(values) => {
            let v: Vec<String> = values.iter().map(|v| format!("`{:?}`", v.value)).collect();
            format!("one of {}", v.join(", "))
        }
        Kind::Sites => "`\"*\"`, a site name, or an array of site names".to_owned(),
        Kind::Array(inner) => format!("array of {}", kind_text(program, inner)),
        Kind::Table(t) => format!("table {}", table_name(&program.tables[*t])),
        Kind::Tables(t) => format!("array of tables {}", table_name(&program.tables[*t])),
        Kind::Tagged(tag, _) => format!("table, by `{tag}`"),
        Kind::Tag(value) => format!("`{value:?}`"),
    }
}

fn default_text(key: &Key) -> String {
    match &key.default {
        DefaultValue::Required => "**required**".to_owned(),
        DefaultValue::Unset => "unset".to_owned(),
        DefaultValue::Empty => "none".to_owned(),
        DefaultValue::Value(v) => format!("`{}`", v.toml()),
        DefaultValue::Table => "its keys' defaults".to_owned(),
        DefaultValue::Computed(func) => format!("computed (`{func}()`): see the description"),
    }
}

/// The environment variable of a key, or `—` where there is none (inside arrays, whole tables).
pub(crate) fn env_var(program: &Program, table: &Table, key: &Key) -> Option<String> {
    if table.in_array
        || matches!(
            key.kind,
            Kind::Table(_) | Kind::Tables(_) | Kind::Tagged(..)
        )
    {
        return None;
    }
    let mut path = table.path.clone();
    path.push(key.name.clone());
    Some(format!(
        "{}{}",
        program.env_prefix,
        path.join("__").to_ascii_uppercase()
    ))
}

fn env_text(program: &Program, table: &Table, key: &Key) -> String {
    env_var(program, table, key).map_or_else(|| "—".to_owned(), |v| format!("`{v}`"))
}

/// A table cell: no pipes, no line breaks.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// Doc text for Markdown: rustdoc links become plain code (a constant gets its value), and `<` outside code
/// spans is escaped so that `<site>` is not taken for HTML. The words are left as written.
pub(crate) fn clean_doc(sources: &Sources, text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("[`") {
        out.push_str(&escape_outside_code(&rest[..start]));
        let after = &rest[start + 2..];
        let Some(end) = after.find("`]") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &after[..end];
        let mut tail = &after[end + 2..];
        if tail.starts_with('(') {
            if let Some(close) = tail.find(')') {
                tail = &tail[close + 1..];
            }
        }
        let _ = write!(out, "`{name}`");
        if let Some(value) = sources.const_value(name) {
            let _ = write!(out, " (`{}`)", value.toml().trim_matches('"'));
        }
        rest = tail;
    }
    out.push_str(&escape_outside_code(rest));
    out
}

fn escape_outside_code(text: &str) -> String {
    text.split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 0 {
                part.replace('<', "\\<")
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}
