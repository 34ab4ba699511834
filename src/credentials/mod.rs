//! Secret sources: one `SecretProvider` trait, one file per backend (its config fields,
//! validation, rotation capability and runtime), the `providers!` registry, and the cache in front.
//!
//! A provider fetches a source's whole document once and applies its mapping, so one store call
//! serves every secret name the source provides.
//!
//! A secret's kind (`[secrets.NAME]`, the `kinds!` registry) says what keyward does with its value
//! before injection: inject it as stored, or mint a short-lived token from it (`mint_cache`).

mod cache;
mod held;
pub mod kind;
mod mint_cache;
mod registry;
pub mod sigv4;
mod source;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use secrecy::SecretString;

pub use cache::{Rejection, Resolved, SecretStatus, SecretStore};
pub use kind::{Kind, MintError, MintScope, STATIC};
pub use mint_cache::{MintStatus, MintedFrom, Minter};
pub use registry::{Check, Provider, ProviderFields, Report};
pub use source::{CachePolicy, RotationPolicy, Schedule, Selector, SourceConfig};

use registry::{either, field_names, knows, read_one};

// The registry: one line per provider module (`Variant => module::Config`), which declares the
// module too. Adding a provider is its file under `secrets/` and its line here.
registry::providers! {
    Aws => aws::AwsConfig,
    File => file::FileConfig,
    Env => env::EnvConfig,
    Vault => vault::VaultConfig,
    Exec => exec::ExecConfig,
}

// The kinds: one line per kind module (`Variant => module::Config`), which declares the module
// too. Adding a credential kind is its file under `credentials/` and its line here.
kind::kinds! {
    GithubApp => github_app::GithubAppConfig,
    OAuth2 => oauth2::OAuth2Config,
    Gcp => gcp::GcpConfig,
}

/// The values one fetch produced, by secret name. Deliberately not `Debug`.
pub struct Fetched {
    pub values: HashMap<String, SecretString>,
    /// The store's version id (AWS `VersionId`), where it has one.
    pub version: Option<String>,
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .field("version", &self.version)
            .finish()
    }
}

/// Why a fetch failed. Messages describe the failure, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("secret store unreachable: {0}")]
    Unreachable(String),
    #[error("secret document is malformed: {0}")]
    Malformed(String),
    #[error("{0}")]
    Unsupported(String),
}

pub trait SecretProvider: Send + Sync {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>>;

    /// The provider's rotation steps, where it can rotate.
    fn rotation(&self) -> Option<&dyn Rotatable> {
        None
    }
}

/// The store side of a rotation: find the candidate, stage a new value, make it current.
pub trait Rotatable: Send + Sync {
    /// The version waiting to become current (AWS `AWSPENDING`; a file's new contents), or `None`
    /// when there is nothing newer than `current_version`.
    fn candidate<'a>(&'a self, current: &'a Fetched) -> BoxFuture<'a, Result<Option<Fetched>, StoreError>>;

    /// Writes `value` for the secret `name` as the pending version, next to the current values.
    fn stage<'a>(&'a self, name: &'a str, value: &'a SecretString) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Makes `candidate` the current version. A failure leaves the current version as it was.
    fn promote<'a>(&'a self, candidate: &'a Fetched) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Whether a plain fetch may return an untested new value (no version stages), so a rotating
    /// source must keep serving its promoted values until a rotation takes the new ones.
    fn pins(&self) -> bool {
        true
    }
}

pub fn build_provider(source: &SourceConfig) -> Arc<dyn SecretProvider> {
    source.provider.build(&source.name, source.mapping.clone())
}

/// Applies a mapping to a document string: `{{.}}` takes it whole, `{{FIELD}}` a string field
/// of the JSON object it holds. Missing fields are left out, so the lookup reports not-found.
pub fn apply_mapping(
    document: &str,
    mapping: &BTreeMap<String, Selector>,
) -> Result<HashMap<String, SecretString>, StoreError> {
    let needs_json = mapping.values().any(|s| matches!(s, Selector::Field(_)));
    let object = if needs_json {
        // serde_json's syntax errors name a position, never the content.
        match serde_json::from_str::<serde_json::Value>(document) {
            Ok(serde_json::Value::Object(map)) => Some(map),
            Ok(_) => return Err(StoreError::Malformed("expected a JSON object of fields".to_string())),
            Err(e) => return Err(StoreError::Malformed(format!("not JSON: {e}"))),
        }
    } else {
        None
    };
    let mut values = HashMap::new();
    for (name, selector) in mapping {
        let value = match selector {
            Selector::Whole => Some(document.to_string()),
            Selector::Field(field) => match object.as_ref().and_then(|o| o.get(field)) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(StoreError::Malformed(format!("field '{field}' is not a string"))),
                None => None,
            },
        };
        if let Some(value) = value {
            values.insert(name.clone(), SecretString::from(value));
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn mapping_selects_fields_or_whole() {
        let mapping: BTreeMap<String, Selector> =
            [("A".to_string(), Selector::Field("a".into())), ("MISSING".to_string(), Selector::Field("nope".into()))]
                .into();
        let values = apply_mapping(r#"{"a":"alpha","b":"beta"}"#, &mapping).unwrap();
        assert_eq!(values["A"].expose_secret(), "alpha");
        assert!(!values.contains_key("MISSING"));

        let whole: BTreeMap<String, Selector> = [("W".to_string(), Selector::Whole)].into();
        assert_eq!(apply_mapping("plain-token", &whole).unwrap()["W"].expose_secret(), "plain-token");
    }

    #[test]
    fn the_registry_knows_each_providers_fields_once() {
        for field in ["region", "secretName", "path", "address", "auth", "command", "timeout_ms"] {
            assert!(is_provider_field(field), "{field}");
        }
        for field in ["name", "provider", "mapping", "cache", "rotation", "adress"] {
            assert!(!is_provider_field(field), "{field}");
        }
        // `path` is read by both file and vault, and listed once.
        assert_eq!(provider_field_names().iter().filter(|n| **n == "path").count(), 1);
        let kinds = ["aws-secrets-manager", "file", "env", "vault", "exec"];
        let mut report = Vec::new();
        let unknown = ProviderConfig::configure(
            "keychain",
            &ProviderFields::default(),
            &mut None,
            &mut Check::new("s", &mut report),
        );
        assert_eq!(unknown.unwrap_err(), format!("expected {}", either(&kinds)));
    }

    impl Report for Vec<(String, String)> {
        fn problem(&mut self, field: String, message: String) {
            self.push((field, message));
        }

        fn path(&self, written: &str) -> std::path::PathBuf {
            written.into()
        }
    }

    #[test]
    fn a_provider_reports_fields_of_other_providers_then_its_own() {
        let fields = ProviderFields::from_pairs([("region", Some("eu-west-1".to_string())), ("path", None)]);
        let mut report = Vec::new();
        let config = ProviderConfig::configure("exec", &fields, &mut None, &mut Check::new("sources[0]", &mut report));
        assert!(config.unwrap().is_none(), "exec needs a command");
        assert_eq!(
            report,
            [
                ("sources[0].region".to_string(), "is not used by provider 'exec'".to_string()),
                (
                    "sources[0].command".to_string(),
                    "is required for provider 'exec': an absolute path to the resolver".to_string()
                ),
            ]
        );
    }

    #[test]
    fn malformed_documents_do_not_echo_content() {
        let mapping: BTreeMap<String, Selector> = [("A".to_string(), Selector::Field("a".into()))].into();
        let err = apply_mapping("sk-canary-not-json", &mapping).unwrap_err();
        assert!(!err.to_string().contains("canary"), "{err}");
        let err = apply_mapping(r#"{"a": 5}"#, &mapping).unwrap_err();
        assert_eq!(err.to_string(), "secret document is malformed: field 'a' is not a string");
    }
}
