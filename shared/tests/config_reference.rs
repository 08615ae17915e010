//! `docs/config-reference.md`: generated from the config model's sources and kept in step with them.
//!
//! The generator parses `shared/src/config/` with `syn` (doc comments, serde attributes, `default_*` fns and
//! `Default` impls; see `config_reference/schema.rs`) and renders one section per program
//! (`config_reference/render.rs`). The tests then hold it to two things:
//!
//! - `reference_is_up_to_date`: the checked-in file is what the generator writes now. Update it with
//!   `UPDATE_CONFIG_REFERENCE=1 cargo test -p shared --test config_reference`.
//! - `reference_matches_model` and `environment_variables_match`: what the reference says is what serde and
//!   the loader do (`config_reference/check.rs`), so a field the generator missed, a wrong default or a
//!   wrong variable name fails here rather than misleading an operator.

#[path = "config_reference/check.rs"]
mod check;
#[path = "config_reference/render.rs"]
mod render;
#[path = "config_reference/schema.rs"]
mod schema;

use std::path::{Path, PathBuf};

use shared::config::{AgentConfig, HubConfig, AGENT_ENV_PREFIX, HUB_ENV_PREFIX};

const UPDATE_VAR: &str = "UPDATE_CONFIG_REFERENCE";
const UPDATE_COMMAND: &str =
    "UPDATE_CONFIG_REFERENCE=1 cargo test -p shared --test config_reference";

fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn workspace_dir() -> PathBuf {
    shared_dir()
        .parent()
        .expect("shared/ is inside the workspace")
        .to_owned()
}

fn programs(sources: &schema::Sources) -> Vec<schema::Program> {
    vec![
        schema::build(sources, "edge-agent", "AgentConfig", AGENT_ENV_PREFIX),
        schema::build(sources, "cloud-hub", "HubConfig", HUB_ENV_PREFIX),
    ]
}

/// The environment test sets variables the config loaders read; every test of this binary loads configs,
/// so they take turns.
fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ENV.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn reference_is_up_to_date() {
    let _env = env_lock();
    let sources = schema::Sources::load(&shared_dir());
    let generated = render::reference(&sources, &programs(&sources));
    let path = workspace_dir().join("docs/config-reference.md");
    if std::env::var_os(UPDATE_VAR).is_some() {
        std::fs::create_dir_all(path.parent().expect("docs/")).expect("create docs/");
        std::fs::write(&path, &generated).expect("write docs/config-reference.md");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != generated {
        panic!(
            "docs/config-reference.md is out of date with shared/src/config/:\n{}\nUpdate it with:\n    {UPDATE_COMMAND}",
            short_diff(&current, &generated)
        );
    }
}

#[test]
fn reference_matches_model() {
    let _env = env_lock();
    let sources = schema::Sources::load(&shared_dir());
    let programs = programs(&sources);
    let (agent, hub) = (&programs[0], &programs[1]);
    let mut problems = check::model(agent, check::round_trip::<AgentConfig>);
    problems.extend(check::model(hub, check::round_trip::<HubConfig>));

    let mut examples: Vec<PathBuf> = ["configs", "shared/testdata/config"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(workspace_dir().join(dir)).expect("list example configs"))
        .map(|e| e.expect("list example configs").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        // testdata also holds configs that are meant to be refused.
        .filter(|p| {
            !p.starts_with(workspace_dir().join("shared")) || name_of(p).ends_with("-valid.toml")
        })
        .collect();
    examples.sort();
    assert!(
        examples.len() >= 3,
        "example configs not found: {examples:?}"
    );
    for path in &examples {
        if name_of(path).starts_with("hub") {
            problems.extend(check::example(hub, path, load_hub_text));
        } else {
            problems.extend(check::example(agent, path, load_agent_text));
        }
    }
    assert!(
        problems.is_empty(),
        "the reference and the model disagree:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn environment_variables_match() {
    let _env = env_lock();
    let inherited: Vec<String> = std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with(shared::config::ENV_PREFIX))
        .collect();
    assert!(
        inherited.is_empty(),
        "unset {inherited:?} to run this test: they override the example configs it loads"
    );
    let sources = schema::Sources::load(&shared_dir());
    let programs = programs(&sources);
    let configs = workspace_dir().join("configs");
    let mut problems = check::environment(&programs[0], &configs.join("edge-line1.toml"), |p| {
        shared::config::load_agent(p)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    problems.extend(check::environment(
        &programs[1],
        &configs.join("hub.toml"),
        |p| {
            shared::config::load_hub(p)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    ));
    assert!(
        problems.is_empty(),
        "environment variables in the reference:\n- {}",
        problems.join("\n- ")
    );
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn load_agent_text(text: &str, base: &Path) -> Result<toml::Table, String> {
    let config = AgentConfig::from_toml_str(text, base).map_err(|e| e.to_string())?;
    reserialize(&config)
}

fn load_hub_text(text: &str, base: &Path) -> Result<toml::Table, String> {
    let config = HubConfig::from_toml_str(text, base).map_err(|e| e.to_string())?;
    reserialize(&config)
}

fn reserialize<T: serde::Serialize>(config: &T) -> Result<toml::Table, String> {
    let text = toml::to_string(config).map_err(|e| e.to_string())?;
    toml::from_str(&text).map_err(|e| e.to_string())
}

/// The changed lines between two texts (a line diff by longest common subsequence), at most 30 of them.
fn short_diff(old: &str, new: &str) -> String {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    // lcs[i][j]: length of the longest common subsequence of old[i..] and new[j..].
    let mut lcs = vec![vec![0u32; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            (i, j) = (i + 1, j + 1);
        } else if i < old.len() && (j == new.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(format!("-{:>4} {}", i + 1, old[i]));
            i += 1;
        } else {
            lines.push(format!("+{:>4} {}", j + 1, new[j]));
            j += 1;
        }
    }
    let more = lines.len().saturating_sub(30);
    lines.truncate(30);
    if more > 0 {
        lines.push(format!("... and {more} more changed lines"));
    }
    lines.join("\n")
}
