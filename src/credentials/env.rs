//! The `env` provider: each secret name maps to an environment variable, `NAME = "{{VAR}}"`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::{Check, Fetched, Provider, SecretProvider, Selector, StoreError};

/// An env source has no fields of its own: its mapping names the variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvConfig;

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFields {}

impl Provider for EnvConfig {
    const KIND: &'static str = "env";
    const WHOLE_VALUE: bool = false;
    type Fields = EnvFields;

    fn configure(
        _fields: EnvFields,
        mapping: &mut Option<BTreeMap<String, String>>,
        check: &mut Check<'_>,
    ) -> Option<EnvConfig> {
        if mapping.is_none() {
            check.problem("mapping", "is required for provider 'env' (secret name = \"{{ENV_VAR}}\")");
        }
        Some(EnvConfig)
    }

    fn rotation_refusals(&self) -> Vec<String> {
        vec!["an env source cannot rotate: its values are fixed when keyward starts".to_string()]
    }

    fn build(&self, _source: &str, mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider> {
        Arc::new(EnvProvider::new(mapping))
    }
}

pub struct EnvProvider {
    mapping: BTreeMap<String, Selector>,
}

impl EnvProvider {
    pub fn new(mapping: BTreeMap<String, Selector>) -> EnvProvider {
        EnvProvider { mapping }
    }
}

impl SecretProvider for EnvProvider {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
        Box::pin(async move {
            let mut values = HashMap::new();
            for (name, selector) in &self.mapping {
                let Selector::Field(var) = selector else {
                    return Err(StoreError::Malformed(format!("'{name}' must name an environment variable")));
                };
                if let Ok(value) = std::env::var(var) {
                    values.insert(name.clone(), SecretString::from(value));
                }
            }
            Ok(Fetched { values, version: None })
        })
    }
}
