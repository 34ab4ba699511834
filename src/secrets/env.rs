//! The `env` provider: each secret name maps to an environment variable, `NAME = "{{VAR}}"`.

use std::collections::{BTreeMap, HashMap};

use futures_util::future::BoxFuture;
use secrecy::SecretString;

use super::{Fetched, SecretProvider, StoreError};
use crate::config::Selector;

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
