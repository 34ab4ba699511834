//! The `aws-secrets-manager` provider: `GetSecretValue` through the real AWS SDK.
//!
//! Credentials come from the standard chain (env, profile, web identity/IRSA, ECS, IMDS); the
//! region from config or the chain; `endpoint_url` or `AWS_ENDPOINT_URL` may point elsewhere.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::DisplayErrorContext;
use futures_util::future::BoxFuture;
use tokio::sync::OnceCell;

use super::{Fetched, SecretProvider, StoreError, apply_mapping};
use crate::config::Selector;

pub struct AwsProvider {
    region: Option<String>,
    endpoint_url: Option<String>,
    secret_name: String,
    version_stage: String,
    mapping: BTreeMap<String, Selector>,
    client: OnceCell<Client>,
}

impl AwsProvider {
    pub fn new(
        region: Option<String>,
        endpoint_url: Option<String>,
        secret_name: String,
        version_stage: String,
        mapping: BTreeMap<String, Selector>,
    ) -> AwsProvider {
        AwsProvider { region, endpoint_url, secret_name, version_stage, mapping, client: OnceCell::new() }
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
                if let Some(region) = &self.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                if let Some(url) = &self.endpoint_url {
                    loader = loader.endpoint_url(url);
                }
                Client::new(&loader.load().await)
            })
            .await
    }
}

impl SecretProvider for AwsProvider {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
        Box::pin(async move {
            let output = self
                .client()
                .await
                .get_secret_value()
                .secret_id(&self.secret_name)
                .version_stage(&self.version_stage)
                .send()
                .await
                .map_err(|e| StoreError::Unreachable(format!("GetSecretValue: {}", DisplayErrorContext(&e))))?;
            let document = match (output.secret_string(), output.secret_binary()) {
                (Some(s), _) => s.to_string(),
                (None, Some(blob)) => String::from_utf8(blob.as_ref().to_vec())
                    .map_err(|_| StoreError::Malformed("SecretBinary is not UTF-8".to_string()))?,
                (None, None) => return Err(StoreError::Malformed("the secret has no value".to_string())),
            };
            let values = apply_mapping(&document, &self.mapping)?;
            Ok(Fetched { values, version: output.version_id().map(str::to_string) })
        })
    }
}
