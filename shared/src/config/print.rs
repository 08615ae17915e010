//! The effective config as an operator sees it (`print-config`): what the program would run with after the
//! file, the environment overrides, the defaults and path resolution, as TOML, with secrets redacted.
//!
//! Secrets are the values of keys named `password` (the external brokers' logins); they serialize in clear
//! elsewhere (the agent keeps its last pushed config on disk), so the redaction is done here, on the tree.

use serde::Serialize;

/// What replaces a secret in printed configs.
pub const REDACTED: &str = "<redacted>";

/// Key names whose values are secrets.
const SECRET_KEYS: [&str; 1] = ["password"];

/// Why a config could not be printed (a value TOML cannot hold; not expected for a loaded config).
#[derive(Debug, thiserror::Error)]
#[error("cannot render the config as TOML")]
pub struct PrintError(#[from] toml::ser::Error);

/// `config` as TOML with every secret replaced by [`REDACTED`].
///
/// # Errors
/// [`PrintError`] when a value has no TOML form.
pub fn redacted_toml<T: Serialize>(config: &T) -> Result<String, PrintError> {
    let mut tree = toml::Value::try_from(config)?;
    redact(&mut tree);
    Ok(toml::to_string_pretty(&tree)?)
}

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) && value.is_str() {
                    *value = toml::Value::String(REDACTED.to_owned());
                } else {
                    redact(value);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentConfig, HubConfig};

    /// Both fixtures print, keep every section, resolve paths, and never show a password.
    #[test]
    fn printed_configs_round_trip_without_secrets() {
        let base = std::path::Path::new("/etc/meshbridge");
        let agent_text = r#"
site = "line1"
data_dir = "state"
[broker]
kind = "external"
address = "127.0.0.1:1883"
username = "meshbridge"
password = "hunter2"
[uplink]
hub = "hub.example:4433"
server_name = "hub.example"
ca = "ca.pem"
cert = "line1.pem"
key = "line1.key"
[[routes]]
filter = "telemetry/#"
"#;
        let agent = AgentConfig::from_toml_str(agent_text, base).expect("valid agent config");
        let printed = redacted_toml(&agent).expect("prints");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains(&format!("password = \"{REDACTED}\"")),
            "{printed}"
        );
        assert!(
            printed.contains("/etc/meshbridge/state"),
            "paths are resolved: {printed}"
        );
        assert!(
            printed.contains("[uplink]") && printed.contains("[[routes]]"),
            "{printed}"
        );
        // With the secret put back, the printed text loads to the same config.
        let restored = printed.replace(REDACTED, "hunter2");
        let again = AgentConfig::from_toml_str(&restored, base).expect("printed config loads");
        assert_eq!(again, agent);

        let hub_text = r#"
data_dir = "hub"
[listen]
quic = "0.0.0.0:4433"
[tls]
ca = "ca.pem"
cert = "hub.pem"
key = "hub.key"
[broker]
kind = "embedded"
listen = "127.0.0.1:1883"
allow_anonymous = true
[[sites]]
name = "line1"
namespace = "acme/plant1/{site}"
"#;
        let hub = HubConfig::from_toml_str(hub_text, base).expect("valid hub config");
        let printed = redacted_toml(&hub).expect("prints");
        let again = HubConfig::from_toml_str(&printed, base).expect("printed config loads");
        assert_eq!(again, hub);
        assert!(
            printed.contains("max_handshakes = 256"),
            "defaults are shown: {printed}"
        );
    }
}
