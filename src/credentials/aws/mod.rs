//! The `aws-secrets-manager` provider's config: the secret (or secrets) a source reads, its
//! region, endpoint and version stage. The SDK runtime is in `sdk` (the `aws` feature); built
//! without it, such a source fails closed at fetch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Check, Provider, SecretProvider, Selector};

#[cfg(feature = "aws")]
mod sdk;

const KIND: &str = "aws-secrets-manager";
const CURRENT: &str = "AWSCURRENT";

/// `secret_name` is the default secret; `secret_ids` names the secret of mapping entries
/// written `"<secret-id>#{{FIELD}}"`. More than one secret is read with one batch call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    pub region: Option<String>,
    pub secret_name: Option<String>,
    pub secret_ids: BTreeMap<String, String>,
    pub endpoint_url: Option<String>,
    pub version_stage: String,
}

/// The AWS fields of a source table, with the article's camelCase names as aliases.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsFields {
    region: Option<String>,
    #[serde(alias = "secretName")]
    secret_name: Option<String>,
    #[serde(alias = "endpointUrl")]
    endpoint_url: Option<String>,
    #[serde(alias = "versionStage")]
    version_stage: Option<String>,
}

impl Provider for AwsConfig {
    const KIND: &'static str = KIND;
    type Fields = AwsFields;

    fn configure(
        s: AwsFields,
        mapping: &mut Option<BTreeMap<String, String>>,
        check: &mut Check<'_>,
    ) -> Option<AwsConfig> {
        let Some(raw_mapping) = mapping.as_ref() else {
            check.problem("mapping", "is required for provider 'aws-secrets-manager'");
            return None;
        };
        // `"<secret-id>#{{FIELD}}"` reads a field of another secret of the same store.
        let mut secret_ids = BTreeMap::new();
        let mut plain = BTreeMap::new();
        for (name, text) in raw_mapping {
            match text.split_once('#') {
                Some((id, rest)) if !id.trim().is_empty() => {
                    secret_ids.insert(name.clone(), id.trim().to_string());
                    plain.insert(name.clone(), rest.to_string());
                }
                _ => {
                    plain.insert(name.clone(), text.clone());
                }
            }
        }
        if s.secret_name.is_none() && secret_ids.len() < raw_mapping.len() {
            check.problem(
                "secret_name",
                "is required for provider 'aws-secrets-manager' unless every mapping entry names its secret (\"<secret-id>#{{FIELD}}\")",
            );
            return None;
        }
        *mapping = Some(plain);
        let ids: BTreeSet<&str> = secret_ids.values().map(String::as_str).chain(s.secret_name.as_deref()).collect();
        if ids.len() > 1 && s.version_stage.as_deref().is_some_and(|v| v != CURRENT) {
            check.problem(
                "version_stage",
                "a source that reads several secrets reads each one's AWSCURRENT (BatchGetSecretValue has no stage)",
            );
        }
        if ids.len() > 20 {
            check.problem("mapping", "one source reads at most 20 AWS secrets (one BatchGetSecretValue call)");
        }
        if let Some(url) = &s.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            check.problem("endpoint_url", "must be an http:// or https:// URL");
        }
        Some(AwsConfig {
            region: s.region,
            secret_name: s.secret_name,
            secret_ids,
            endpoint_url: s.endpoint_url,
            version_stage: s.version_stage.unwrap_or_else(|| CURRENT.to_string()),
        })
    }

    /// Rotation moves one secret's AWSCURRENT stage.
    fn rotation_refusals(&self) -> Vec<String> {
        let mut refusals = Vec::new();
        if !self.secret_ids.is_empty() {
            refusals.push(
                "rotation works on one AWS secret per source; move the \"<secret-id>#\" entries to sources of their own"
                    .to_string(),
            );
        }
        if self.version_stage != CURRENT {
            refusals.push(format!(
                "rotation promotes to AWSCURRENT, but this source reads version_stage '{}'; read AWSCURRENT or turn rotation off",
                self.version_stage
            ));
        }
        refusals
    }

    #[cfg(feature = "aws")]
    fn build(&self, _source: &str, mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider> {
        Arc::new(sdk::AwsProvider::new(sdk::AwsSettings {
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            secret_name: self.secret_name.clone(),
            secret_ids: self.secret_ids.clone(),
            version_stage: self.version_stage.clone(),
            mapping,
        }))
    }

    #[cfg(not(feature = "aws"))]
    fn build(&self, _source: &str, _mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider> {
        Arc::new(Unavailable("keyward was built without the `aws` feature"))
    }
}

/// A provider that always fails closed, for backends left out of this build.
#[cfg(not(feature = "aws"))]
struct Unavailable(&'static str);

#[cfg(not(feature = "aws"))]
impl SecretProvider for Unavailable {
    fn fetch(&self) -> futures_util::future::BoxFuture<'_, Result<super::Fetched, super::StoreError>> {
        Box::pin(async move { Err(super::StoreError::Unreachable(self.0.to_string())) })
    }
}
