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

/// A mint of a credential: the secret's name, its kind and `ok` or `error`. Never a value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MintLabels {
    pub secret: String,
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// A configured agent (a delegated key counts under its root agent).
    pub agent: String,
    /// A model from the price table, or `other`.
    pub model: String,
    pub route: String,
    /// `input`, `output`, `cache_read` or `cache_write`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub agent: String,
    pub model: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabel {
    pub budget: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WouldDenyLabels {
    pub agent: String,
    /// `budget`, `quota`, `grant` or `role`.
    pub policy: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabel, Histogram>,
    pub secret_fetches: Family<FetchLabels, Counter>,
    pub secret_cache_hits: Family<SourceLabel, Counter>,
    pub secret_stale_served: Family<SourceLabel, Counter>,
    pub rotations: Family<RotationLabels, Counter>,
    pub credential_mints: Family<MintLabels, Counter>,
    pub anomalies: Family<AnomalyLabels, Counter>,
    pub limits_backend_transitions: Family<TransitionLabel, Counter>,
    pub audit_records: Counter,
    pub audit_write_errors: Counter,
    pub connections_parked: Gauge,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost_usd: Family<CostLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Metered calls whose answer reported no usage (settled at their reservation).
    pub usage_missing: Family<RouteLabel, Counter>,
    pub budget_refusals: Family<BudgetLabel, Counter>,
    pub budget_cuts: Family<BudgetLabel, Counter>,
    pub would_deny: Family<WouldDenyLabels, Counter>,
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
        let credential_mints = Family::<MintLabels, Counter>::default();
        registry.register(
            "credential_mints",
            "Tokens minted from secrets of a minted kind, by secret, kind and result",
            credential_mints.clone(),
        );
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
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens used, by agent, model (price-table name or other), route and kind",
            tokens.clone(),
        );
        let cost_usd = Family::<CostLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("cost_usd", "Cost in USD from the price table, by agent, model and route", cost_usd.clone());
        let usage_missing = Family::<RouteLabel, Counter>::default();
        registry.register(
            "usage_missing",
            "Metered calls whose answer reported no usage, settled at their reservation",
            usage_missing.clone(),
        );
        let budget_refusals = Family::<BudgetLabel, Counter>::default();
        registry.register("budget_refusals", "Calls refused because a budget had no room", budget_refusals.clone());
        let budget_cuts = Family::<BudgetLabel, Counter>::default();
        registry.register(
            "budget_cuts",
            "Streams ended early because they would exhaust a budget",
            budget_cuts.clone(),
        );
        let would_deny = Family::<WouldDenyLabels, Counter>::default();
        registry.register(
            "would_deny",
            "Calls a policy in shadow mode would have refused, by agent and kind of policy",
            would_deny.clone(),
        );
        Metrics {
            registry,
            tokens,
            cost_usd,
            usage_missing,
            budget_refusals,
            budget_cuts,
            would_deny,
            requests,
            request_duration,
            secret_fetches,
            secret_cache_hits,
            secret_stale_served,
            rotations,
            credential_mints,
            anomalies,
            limits_backend_transitions,
            audit_records,
            audit_write_errors,
            connections_parked,
            connections_open,
            connections_refused,
        }
    }

    /// Every metric in the `format` a scraper asked for.
    pub fn encode(&self, format: Exposition) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Text => openmetrics_to_text(&out),
        }
    }
}

/// The two exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// The classic Prometheus text format 0.0.4: the default, read by every scraper and `promtool`.
    Text,
    /// OpenMetrics 1.0.0, for a scraper that asks for it in `Accept`.
    OpenMetrics,
}

impl Exposition {
    /// Picks the format from an `Accept` header: OpenMetrics when the client accepts it at least as
    /// much as anything else it lists (Prometheus itself sends `application/openmetrics-text` first
    /// with q=1 and `text/plain` at q=0.5), otherwise the classic text format.
    pub fn negotiate(accept: Option<&str>) -> Exposition {
        let Some(accept) = accept else { return Exposition::Text };
        let mut openmetrics = 0.0_f32;
        let mut other = 0.0_f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if media == "application/openmetrics-text" {
                openmetrics = openmetrics.max(quality);
            } else {
                other = other.max(quality);
            }
        }
        if openmetrics > 0.0 && openmetrics >= other { Exposition::OpenMetrics } else { Exposition::Text }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Text => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics output (the only format it writes) as Prometheus text
/// 0.0.4. The formats differ in what matters here: an OpenMetrics counter family `x` has samples
/// `x_total` (and `x_created`), while in 0.0.4 the HELP and TYPE lines must name the sample itself,
/// or a parser reads the counter as untyped with no help; 0.0.4 has no `# UNIT`, no `# EOF`, no
/// exemplars and calls `unknown` `untyped`.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE; it is held until TYPE says whether the family is a counter.
    let mut help: Option<(&str, &str)> = None;
    let mut counter: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (sample_name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_string(), "untyped"),
                kind => (name.to_string(), kind),
            };
            counter = (kind == "counter").then_some(name);
            if let Some((_, text)) = help.take().filter(|(help_name, _)| *help_name == name) {
                out.push_str(&format!("# HELP {sample_name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {sample_name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if counter.is_some_and(|name| line.strip_prefix(name).is_some_and(|rest| rest.starts_with("_created"))) {
            continue;
        }
        // An exemplar follows the value after " # ".
        let sample = line.split_once(" # ").map_or(line, |(sample, _)| sample);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_format() {
        let cases = [
            (None, Exposition::Text),
            (Some("*/*"), Exposition::Text),
            (Some("text/plain"), Exposition::Text),
            (Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"), Exposition::Text),
            (Some("application/openmetrics-text"), Exposition::OpenMetrics),
            (Some("application/openmetrics-text; version=1.0.0"), Exposition::OpenMetrics),
            // What Prometheus 2.x sends.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                     text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Exposition::OpenMetrics,
            ),
            (Some("text/plain;q=1, application/openmetrics-text;q=0.5"), Exposition::Text),
            (Some("application/openmetrics-text;q=0"), Exposition::Text),
        ];
        for (accept, expected) in cases {
            assert_eq!(Exposition::negotiate(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn text_format_names_help_and_type_after_the_samples() {
        let metrics = Metrics::new();
        metrics.requests.get_or_create(&RequestLabels { route: "a".into(), status: 200, decision: "allowed" }).inc();
        metrics.request_duration.get_or_create(&RouteLabel { route: "a".into() }).observe(0.2);
        let text = metrics.encode(Exposition::Text);
        assert!(text.contains("# HELP keyward_requests_total Requests by route, status and decision.\n"), "{text}");
        assert!(text.contains("# TYPE keyward_requests_total counter\n"), "{text}");
        assert!(text.contains("keyward_requests_total{route=\"a\",status=\"200\",decision=\"allowed\"} 1\n"));
        assert!(text.contains("# TYPE keyward_request_duration_seconds histogram\n"), "{text}");
        assert!(text.contains("# TYPE keyward_connections_parked gauge\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        // Every TYPE line has its HELP line just before it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate().filter(|(_, l)| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(i > 0 && lines[i - 1].starts_with(&format!("# HELP {name} ")), "no help for {name}");
        }
        let openmetrics = metrics.encode(Exposition::OpenMetrics);
        assert!(openmetrics.ends_with("# EOF\n") && openmetrics.contains("# TYPE keyward_requests counter\n"));
    }

    #[test]
    fn openmetrics_only_parts_are_dropped() {
        let openmetrics = "# HELP x_seconds X.\n# TYPE x_seconds counter\n# UNIT x_seconds seconds\n\
                           x_seconds_total 3 # {trace=\"t\"} 1\nx_seconds_created 17\n\
                           # HELP u U.\n# TYPE u unknown\nu 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "# HELP x_seconds_total X.\n# TYPE x_seconds_total counter\nx_seconds_total 3\n\
             # HELP u U.\n# TYPE u untyped\nu 1\n"
        );
    }
}
