//! A metered call: the usage meter over its answer's decoded bytes (`MeteredBody`, between
//! decoding and scrubbing), the mid-stream cut-off, and the settlement of its reservation when
//! the call ends, which fills the audit record's `usage` and the token and cost metrics.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use zeroize::Zeroizing;

use super::budget::{self, Amount, Budgets, Reservation};
use super::shared::Shared;
use crate::audit::{Settle, Settled, UsageRecord};
use crate::config::budget::{Price, UsageConfig};
use crate::metrics::{BudgetLabel, CostLabels, Metrics, RouteLabel, TokenLabels};
use crate::usage::{Api, Usage, UsageMeter};

/// What the call reserved, as usage, for the record of a call settled at its reservation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reserved {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One metered call, shared by its response body and its audit guard.
pub struct Metering {
    api: Api,
    /// keyward added `include_usage`; the usage chunk is taken out of the answer again.
    strip_usage_chunk: bool,
    meter: Mutex<Option<UsageMeter>>,
    status: AtomicU16,
    cut: AtomicBool,
    cut_after_output: Option<(u64, String)>,
    request_model: Option<String>,
    reserved: Reserved,
    reservation: Mutex<Option<Reservation>>,
    usage_config: Arc<UsageConfig>,
    budgets: Arc<Budgets>,
    shared: Option<Arc<Shared>>,
    metrics: Arc<Metrics>,
    agent: String,
    route: String,
    /// The key the agent presented: a model name (the agent's text, or an upstream's echo of it)
    /// is recorded without it.
    agent_key: Option<Zeroizing<String>>,
}

/// Whose call it is: the root agent and route (metric labels), and the key the agent presented
/// (kept out of the model name the record holds).
pub struct Call<'a> {
    pub agent: &'a str,
    pub route: &'a str,
    pub agent_key: Option<&'a str>,
}

/// The handles a metered call settles with.
pub struct Handles {
    pub usage_config: Arc<UsageConfig>,
    pub budgets: Arc<Budgets>,
    pub shared: Option<Arc<Shared>>,
    pub metrics: Arc<Metrics>,
}

impl Metering {
    pub fn new(
        api: Api,
        strip_usage_chunk: bool,
        request_model: Option<String>,
        reserved: Reserved,
        reservation: Option<Reservation>,
        handles: Handles,
        call: Call<'_>,
    ) -> Arc<Metering> {
        Arc::new(Metering {
            api,
            strip_usage_chunk,
            meter: Mutex::new(None),
            status: AtomicU16::new(0),
            cut: AtomicBool::new(false),
            cut_after_output: reservation.as_ref().and_then(|r| r.cut_after_output.clone()),
            request_model,
            reserved,
            reservation: Mutex::new(reservation),
            usage_config: handles.usage_config,
            budgets: handles.budgets,
            shared: handles.shared,
            metrics: handles.metrics,
            agent: call.agent.to_string(),
            route: call.route.to_string(),
            agent_key: call.agent_key.map(|k| Zeroizing::new(k.to_string())),
        })
    }

    /// The answer's head arrived: a successful answer is metered (as a stream when it is
    /// `text/event-stream`). Returns whether the body the agent gets may differ in length
    /// from the upstream's (a metered stream).
    pub fn answered(&self, status: http::StatusCode, headers: &http::HeaderMap) -> bool {
        self.status.store(status.as_u16(), Ordering::Relaxed);
        if !status.is_success() {
            return false;
        }
        let sse = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
        let estimate = self.cut_after_output.is_some();
        *self.meter.lock().expect("meter lock") =
            Some(UsageMeter::new(self.api, sse, self.strip_usage_chunk, estimate));
        sse
    }

    fn push(&self, data: Bytes) -> (Bytes, bool) {
        let mut meter = self.meter.lock().expect("meter lock");
        let Some(meter) = meter.as_mut() else { return (data, false) };
        let limit = self.cut_after_output.as_ref().map(|(n, _)| *n);
        let (out, cut) = meter.push(data, &mut |m| limit.is_some_and(|n| m.output_estimate() > n));
        if cut {
            self.cut.store(true, Ordering::Relaxed);
            if let Some((_, budget)) = &self.cut_after_output {
                self.metrics.budget_cuts.get_or_create(&BudgetLabel { budget: budget.clone() }).inc();
            }
        }
        (out, cut)
    }

    fn finish(&self) -> Bytes {
        self.meter.lock().expect("meter lock").as_mut().map(UsageMeter::finish).unwrap_or_default()
    }

    /// The audit guard's settlement: what the call used, charged to its budgets and counted.
    pub fn settle_hook(self: &Arc<Metering>) -> Settle {
        let metering = self.clone();
        Box::new(move |released| metering.settle(released))
    }

    fn settle(&self, released: bool) -> Settled {
        let cut = self.cut.load(Ordering::Relaxed);
        let status = self.status.load(Ordering::Relaxed);
        let (reported, partial, model) = {
            let meter = self.meter.lock().expect("meter lock");
            match meter.as_ref() {
                Some(m) => (m.usage(), m.partial(), m.model().map(str::to_string)),
                None => (None, Usage::default(), None),
            }
        };
        let key = self.agent_key.as_deref().map(String::as_str);
        let model = model.or_else(|| self.request_model.clone()).map(|m| crate::usage::without_key(m, key));
        let reserved_usage = Usage {
            input_tokens: self.reserved.input_tokens,
            output_tokens: self.reserved.output_tokens,
            ..Usage::default()
        };
        // Reported usage is charged as it is. An answer that reported none is charged its
        // reservation (a stream keyward cut off: its estimate, if that is more); a call that
        // never reached the upstream, or that it refused (status 400 or above), costs nothing.
        let (usage, from_answer) = match reported {
            Some(usage) => (usage, true),
            None if cut => {
                let mut usage = reserved_usage;
                usage.output_tokens = usage.output_tokens.max(partial.output_tokens);
                usage.input_tokens = usage.input_tokens.max(partial.input_tokens);
                (usage, false)
            }
            None if released && (200..400).contains(&status) => {
                self.metrics.usage_missing.get_or_create(&RouteLabel { route: self.route.clone() }).inc();
                (reserved_usage, false)
            }
            None => (Usage::default(), false),
        };
        let price = self.price(model.as_deref());
        let micro_usd = price.map(|p| usage.cost_micro_usd(&p));
        self.count(&usage, model.as_deref(), micro_usd);
        if let Some(reservation) = self.reservation.lock().expect("reservation lock").take() {
            let used = Amount { tokens: usage.total(), micro_usd: micro_usd.unwrap_or(0) };
            let budgets = self.budgets.clone();
            let shared = self.shared.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        budgets.settle(shared.as_deref(), &reservation, used, budget::unix_now()).await;
                    });
                }
                Err(_) => tracing::warn!("no runtime to settle a budget reservation in; it lapses with its window"),
            }
        }
        let touched = from_answer || usage.total() > 0;
        Settled {
            usage: (touched || released).then(|| UsageRecord {
                cache_read_tokens: usage.cache_read_tokens,
                cache_write_tokens: usage.cache_write_tokens,
                cost_usd: micro_usd.map(budget::usd),
                input_tokens: usage.input_tokens,
                model,
                output_tokens: usage.output_tokens,
                reported: from_answer,
            }),
            cut,
        }
    }

    /// The price of the model the answer named, else of the one the request asked for.
    fn price(&self, model: Option<&str>) -> Option<Price> {
        let config = &self.usage_config;
        model
            .and_then(|m| config.priced_as(m))
            .or_else(|| self.request_model.as_deref().and_then(|m| config.priced_as(m)))
            .and_then(|name| config.prices.get(name).copied())
            .or_else(|| config.price(None))
    }

    fn count(&self, usage: &Usage, model: Option<&str>, micro_usd: Option<u64>) {
        // Only price-table names become labels, so an agent cannot grow the label set.
        let model = model.and_then(|m| self.usage_config.priced_as(m)).unwrap_or("other").to_string();
        for (kind, tokens) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
        ] {
            if tokens > 0 {
                let labels =
                    TokenLabels { agent: self.agent.clone(), model: model.clone(), route: self.route.clone(), kind };
                self.metrics.tokens.get_or_create(&labels).inc_by(tokens);
            }
        }
        if let Some(micro) = micro_usd.filter(|m| *m > 0) {
            let labels = CostLabels { agent: self.agent.clone(), model, route: self.route.clone() };
            self.metrics.cost_usd.get_or_create(&labels).inc_by(budget::usd(micro));
        }
    }
}

/// The answer's body, read by the meter as it passes (and ended early by a cut-off).
pub struct MeteredBody<B> {
    inner: B,
    metering: Option<Arc<Metering>>,
    done: bool,
}

impl<B> MeteredBody<B> {
    pub fn new(inner: B, metering: Option<Arc<Metering>>) -> MeteredBody<B> {
        MeteredBody { inner, metering, done: false }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let Some(metering) = this.metering.clone() else { return Pin::new(&mut this.inner).poll_frame(cx) };
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    let (mut out, cut) = metering.push(data);
                    if cut {
                        this.done = true;
                    } else if this.inner.is_end_stream() {
                        this.done = true;
                        let rest = metering.finish();
                        if !rest.is_empty() {
                            out = [out, rest].concat().into();
                        }
                    }
                    if out.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = metering.finish();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // The inner body ends either before any frame (an empty body: nothing to meter) or with
        // the frame after which the meter was finished (`done`), so its end is this body's end.
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.metering.is_some() { SizeHint::default() } else { self.inner.size_hint() }
    }
}
