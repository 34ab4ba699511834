//! Prometheus metrics. Label values come from config names and status codes only, so label
//! cardinality stays bounded and no label can carry a secret.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub source: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnomalyLabels {
    pub detector: &'static str,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabel {
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub source: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabel, Histogram>,
    pub secret_fetches: Family<FetchLabels, Counter>,
    pub secret_cache_hits: Family<SourceLabel, Counter>,
    pub secret_stale_served: Family<SourceLabel, Counter>,
    pub rotations: Family<RotationLabels, Counter>,
    pub anomalies: Family<AnomalyLabels, Counter>,
    pub limits_backend_transitions: Family<TransitionLabel, Counter>,
    pub audit_records: Counter,
    pub audit_write_errors: Counter,
    pub connections_parked: Gauge,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keyward");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests by route, status and decision", requests.clone());
        let request_duration = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0])
        });
        registry.register("request_duration_seconds", "Request duration through keyward", request_duration.clone());
        let secret_fetches = Family::<FetchLabels, Counter>::default();
        registry.register("secret_fetches", "Secret store fetches by source and result", secret_fetches.clone());
        let secret_cache_hits = Family::<SourceLabel, Counter>::default();
        registry.register("secret_cache_hits", "Secret lookups served from cache", secret_cache_hits.clone());
        let secret_stale_served = Family::<SourceLabel, Counter>::default();
        registry.register(
            "secret_stale_served",
            "Expired secrets served because the store was down (stale_if_error_seconds)",
            secret_stale_served.clone(),
        );
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register("rotations", "Rotation runs by source and outcome", rotations.clone());
        let anomalies = Family::<AnomalyLabels, Counter>::default();
        registry.register("anomalies", "Anomaly detector decisions by detector and action", anomalies.clone());
        let limits_backend_transitions = Family::<TransitionLabel, Counter>::default();
        registry.register(
            "limits_backend_transitions",
            "Times the shared limits backend (Redis) went down or came back",
            limits_backend_transitions.clone(),
        );
        let audit_records = Counter::default();
        registry.register("audit_records", "Audit records written", audit_records.clone());
        let audit_write_errors = Counter::default();
        registry.register("audit_write_errors", "Audit records that could not be written", audit_write_errors.clone());
        let connections_parked = Gauge::default();
        registry.register(
            "connections_parked",
            "Idle HTTP/1 keep-alive connections parked now (their buffers released until the next request)",
            connections_parked.clone(),
        );
        let connections_open = Gauge::default();
        registry.register("connections_open", "Connections open now, on every listener", connections_open.clone());
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections refused because their listener held server.max_connections already",
            connections_refused.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            secret_fetches,
            secret_cache_hits,
            secret_stale_served,
            rotations,
            anomalies,
            limits_backend_transitions,
            audit_records,
            audit_write_errors,
            connections_parked,
            connections_open,
            connections_refused,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
