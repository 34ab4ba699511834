//! The `aws-secrets-manager` provider: `GetSecretValue` (or `BatchGetSecretValue` when a source
//! reads several secrets) through the real AWS SDK, and rotation by version stages.
//!
//! Credentials come from the standard chain (env, profile, web identity/IRSA, ECS, IMDS); the
//! region from config or the chain; `endpoint_url` or `AWS_ENDPOINT_URL` may point elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::ProvideErrorMetadata;
use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

use crate::credentials::{Fetched, Rotatable, SecretProvider, Selector, StoreError, apply_mapping};

const CURRENT: &str = "AWSCURRENT";
const PENDING: &str = "AWSPENDING";

pub struct AwsSettings {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// The secret of every mapping entry that does not name its own.
    pub secret_name: Option<String>,
    /// Secret name → the AWS secret its entry reads, for `"<secret-id>#{{FIELD}}"` entries.
    pub secret_ids: BTreeMap<String, String>,
    pub version_stage: String,
    pub mapping: BTreeMap<String, Selector>,
}

pub struct AwsProvider {
    settings: AwsSettings,
    /// AWS secret id → the part of the mapping it serves.
    groups: BTreeMap<String, BTreeMap<String, Selector>>,
    client: OnceCell<Client>,
}

/// One secret's value and version.
struct Document {
    text: String,
    version: Option<String>,
    stages: Vec<String>,
    created: Option<aws_sdk_secretsmanager::primitives::DateTime>,
}

impl AwsProvider {
    pub fn new(settings: AwsSettings) -> AwsProvider {
        let mut groups: BTreeMap<String, BTreeMap<String, Selector>> = BTreeMap::new();
        for (name, selector) in &settings.mapping {
            let id = settings.secret_ids.get(name).or(settings.secret_name.as_ref());
            if let Some(id) = id {
                groups.entry(id.clone()).or_default().insert(name.clone(), selector.clone());
            }
        }
        AwsProvider { settings, groups, client: OnceCell::new() }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(Duration::from_secs(3))
                            .operation_attempt_timeout(Duration::from_secs(5))
                            .operation_timeout(Duration::from_secs(12))
                            .build(),
                    )
                    .retry_config(RetryConfig::standard().with_max_attempts(2));
                if let Some(region) = &self.settings.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                if let Some(url) = &self.settings.endpoint_url {
                    loader = loader.endpoint_url(url);
                }
                Client::new(&loader.load().await)
            })
            .await
    }

    /// The one secret a rotating source reads (validation allows rotation only then).
    fn rotating_secret(&self) -> Result<(&String, &BTreeMap<String, Selector>), StoreError> {
        match self.groups.iter().next() {
            Some(group) if self.groups.len() == 1 => Ok(group),
            _ => Err(StoreError::Unsupported("rotation works on a source that reads exactly one AWS secret".into())),
        }
    }

    /// `Ok(None)` when the secret has no version in `stage`.
    async fn get(&self, id: &str, stage: &str) -> Result<Option<Document>, StoreError> {
        let result = self.client().await.get_secret_value().secret_id(id).version_stage(stage).send().await;
        let output = match result {
            Ok(output) => output,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => return Ok(None),
            Err(e) => return Err(sdk_error("GetSecretValue", &e)),
        };
        let text = document_text(output.secret_string(), output.secret_binary().map(|b| b.as_ref()))?;
        Ok(Some(Document {
            text,
            version: output.version_id().map(str::to_string),
            stages: output.version_stages().to_vec(),
            created: output.created_date().copied(),
        }))
    }

    async fn get_many(&self) -> Result<HashMap<String, Document>, StoreError> {
        let ids: Vec<String> = self.groups.keys().cloned().collect();
        let output = self
            .client()
            .await
            .batch_get_secret_value()
            .set_secret_id_list(Some(ids.clone()))
            .send()
            .await
            .map_err(|e| sdk_error("BatchGetSecretValue", &e))?;
        if let Some(error) = output.errors().first() {
            return Err(StoreError::Unreachable(format!(
                "BatchGetSecretValue: {}: {}",
                error.secret_id().unwrap_or("?"),
                error.error_code().unwrap_or("error")
            )));
        }
        let mut documents = HashMap::new();
        for entry in output.secret_values() {
            let text = document_text(entry.secret_string(), entry.secret_binary().map(|b| b.as_ref()))?;
            let document = Document {
                text,
                version: entry.version_id().map(str::to_string),
                stages: entry.version_stages().to_vec(),
                created: entry.created_date().copied(),
            };
            // The answer names secrets by name and ARN; match either to what was asked.
            if let Some(id) =
                ids.iter().find(|id| Some(id.as_str()) == entry.name() || Some(id.as_str()) == entry.arn())
            {
                documents.insert(id.clone(), document);
            }
        }
        if let Some(missing) = ids.iter().find(|id| !documents.contains_key(*id)) {
            return Err(StoreError::Unreachable(format!("BatchGetSecretValue returned no value for {missing}")));
        }
        Ok(documents)
    }
}

fn document_text(string: Option<&str>, binary: Option<&[u8]>) -> Result<String, StoreError> {
    match (string, binary) {
        (Some(s), _) => Ok(s.to_string()),
        (None, Some(blob)) => {
            String::from_utf8(blob.to_vec()).map_err(|_| StoreError::Malformed("SecretBinary is not UTF-8".to_string()))
        }
        (None, None) => Err(StoreError::Malformed("the secret has no value".to_string())),
    }
}

/// What the standard credential chain tries, in its order, and what a user sets to satisfy it.
const NO_CREDENTIALS: &str = "no AWS credentials found; tried the environment (AWS_ACCESS_KEY_ID), \
     the shared config and credentials files (AWS_PROFILE), a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE), \
     the ECS container endpoint and EC2 instance metadata (IMDS); set AWS_ACCESS_KEY_ID and \
     AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a role (IRSA, ECS task role, instance profile)";

/// A failed SDK call in one line. Without credentials the SDK's own message is a page of nested
/// `Debug` output ending in IMDS's connect error, which misleads: say what was tried and what to
/// set instead. Other failures are the chain of their messages, without `Debug` parts.
fn sdk_error(call: &str, error: &(dyn std::error::Error + 'static)) -> StoreError {
    let chain = std::iter::successors(Some(error), |e| e.source());
    let mut messages: Vec<String> = Vec::new();
    for cause in chain {
        if let Some(CredentialsError::CredentialsNotLoaded(_)) = cause.downcast_ref::<CredentialsError>() {
            return StoreError::Unreachable(format!("{call}: {NO_CREDENTIALS}"));
        }
        let message = cause.to_string();
        // Wrappers often repeat their source's message; keep each once.
        if !messages.last().is_some_and(|last| last.ends_with(&message)) {
            messages.push(message);
        }
    }
    StoreError::Unreachable(format!("{call}: {}", messages.join(": ").replace('\n', " ")))
}

fn service_error(call: &str, e: &impl ProvideErrorMetadata) -> StoreError {
    StoreError::Unreachable(format!("{call}: {}: {}", e.code().unwrap_or("error"), e.message().unwrap_or("")))
}

impl SecretProvider for AwsProvider {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
        Box::pin(async move {
            if self.groups.len() > 1 {
                // The article's "read multiple credentials at one time": one call for all of them.
                let documents = self.get_many().await?;
                let mut values = HashMap::new();
                let mut versions = Vec::new();
                for (id, mapping) in &self.groups {
                    let document = &documents[id];
                    values.extend(apply_mapping(&document.text, mapping)?);
                    versions.push(document.version.clone().unwrap_or_default());
                }
                return Ok(Fetched { values, version: Some(versions.join(",")) });
            }
            let Some((id, mapping)) = self.groups.iter().next() else {
                return Ok(Fetched { values: HashMap::new(), version: None });
            };
            match self.get(id, &self.settings.version_stage).await? {
                Some(document) => {
                    Ok(Fetched { values: apply_mapping(&document.text, mapping)?, version: document.version })
                }
                None => Err(StoreError::Unreachable(format!(
                    "GetSecretValue: {id} has no version in stage {}",
                    self.settings.version_stage
                ))),
            }
        })
    }

    fn rotation(&self) -> Option<&dyn Rotatable> {
        Some(self)
    }
}

impl Rotatable for AwsProvider {
    /// AWSCURRENT only ever holds a promoted version.
    fn pins(&self) -> bool {
        false
    }

    fn candidate<'a>(&'a self, current: &'a Fetched) -> BoxFuture<'a, Result<Option<Fetched>, StoreError>> {
        Box::pin(async move {
            let (id, mapping) = self.rotating_secret()?;
            let Some(pending) = self.get(id, PENDING).await? else { return Ok(None) };
            // Compared with AWSCURRENT as the store has it now, not as keyward cached it.
            let actual = self.get(id, CURRENT).await?;
            let current_version = actual.as_ref().map_or(current.version.clone(), |d| d.version.clone());
            if pending.version.is_some() && pending.version == current_version {
                // A finished rotation leaves AWSPENDING on the current version: nothing new.
                return Ok(None);
            }
            let older = match (pending.created, actual.as_ref().and_then(|d| d.created)) {
                (Some(p), Some(c)) => p.secs() < c.secs(),
                _ => false,
            };
            if older || pending.stages.iter().any(|s| s == "AWSPREVIOUS") {
                // Promoting it would roll the store back to a version it has already replaced.
                return Err(StoreError::Unsupported(format!(
                    "AWSPENDING of {id} is older than AWSCURRENT (a stage left from an earlier rotation); \
                     clear it or stage a new version"
                )));
            }
            Ok(Some(Fetched { values: apply_mapping(&pending.text, mapping)?, version: pending.version }))
        })
    }

    fn stage<'a>(&'a self, name: &'a str, value: &'a SecretString) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let (id, mapping) = self.rotating_secret()?;
            let document = match mapping.get(name) {
                Some(Selector::Whole) => value.expose_secret().to_string(),
                Some(Selector::Field(field)) => {
                    let current = self.get(id, CURRENT).await?.map(|d| d.text).unwrap_or_else(|| "{}".to_string());
                    let mut object = match serde_json::from_str::<serde_json::Value>(&current) {
                        Ok(serde_json::Value::Object(map)) => map,
                        _ => return Err(StoreError::Malformed("the current version is not a JSON object".into())),
                    };
                    object.insert(field.clone(), serde_json::Value::String(value.expose_secret().to_string()));
                    serde_json::Value::Object(object).to_string()
                }
                None => return Err(StoreError::Unsupported(format!("this source does not provide '{name}'"))),
            };
            self.client()
                .await
                .put_secret_value()
                .secret_id(id)
                .secret_string(document)
                .version_stages(PENDING)
                .send()
                .await
                .map_err(|e| service_error("PutSecretValue", &e))?;
            Ok(())
        })
    }

    fn promote<'a>(&'a self, candidate: &'a Fetched) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let (id, _) = self.rotating_secret()?;
            let Some(new_version) = candidate.version.as_deref() else {
                return Err(StoreError::Malformed("the pending version has no version id".into()));
            };
            // Read now, not from the cache: AWS moves the stage only off its actual holder.
            let old_version = self.get(id, CURRENT).await?.and_then(|d| d.version);
            let client = self.client().await;
            let mut update = client.update_secret_version_stage().secret_id(id).version_stage(CURRENT);
            update = update.move_to_version_id(new_version);
            if let Some(old) = old_version.as_deref().filter(|old| *old != new_version) {
                update = update.remove_from_version_id(old);
            }
            update.send().await.map_err(|e| service_error("UpdateSecretVersionStage", &e))?;
            // Clear AWSPENDING so the next run does not see this version as new again.
            let cleared = client
                .update_secret_version_stage()
                .secret_id(id)
                .version_stage(PENDING)
                .remove_from_version_id(new_version)
                .send()
                .await;
            if let Err(e) = cleared {
                tracing::warn!(error = %service_error("UpdateSecretVersionStage", &e), "AWSPENDING left on the promoted version");
            }
            Ok(())
        })
    }
}
