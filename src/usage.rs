//! Token usage from the answers of the LLM APIs keyward meters, read as the bytes pass through:
//! OpenAI Chat Completions (`usage`; streamed, the final chunk's `usage`), OpenAI Responses
//! (`usage`; streamed, the `response.completed` event's) and Anthropic Messages (`usage`;
//! streamed, `message_start` plus `message_delta`, with cache-creation and cache-read tokens).
//!
//! A stream is handled event by event: an event goes on to the agent as soon as its blank line
//! has arrived, and only the unfinished event is held. A JSON answer passes through untouched
//! while a copy (up to `MAX_JSON_COPY`) is kept to read `usage` from at its end.
//!
//! Token counts are normalised so nothing is counted twice: `input_tokens` are input tokens at
//! the full input price, `cache_read_tokens` and `cache_write_tokens` the cached parts. OpenAI's
//! `prompt_tokens` include the cached ones (`prompt_tokens_details.cached_tokens`), so those are
//! taken out of `input_tokens`; Anthropic reports the three apart already.

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde_json::Value;

/// The most of a JSON answer kept to read its usage from; a larger answer is settled at its
/// reservation (counted as "no usage").
pub const MAX_JSON_COPY: usize = 4 << 20;

/// The most answers (`n`) one request's reservation counts; OpenAI allows 128.
pub const MAX_COMPLETIONS: u64 = 128;

/// The most of one unfinished SSE event held back while it arrives. A longer "event" (an
/// upstream that never sends a blank line) ends metering: what was held and everything after it
/// goes on as it comes, and the call is settled without reported usage.
pub const MAX_HELD_EVENT: usize = 1 << 20;

/// Which API an answer comes from, decided by the request (method and path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST …/chat/completions` (also `…/completions` and `…/embeddings`, same `usage` shape).
    ChatCompletions,
    /// `POST …/responses`
    Responses,
    /// `POST …/messages`
    AnthropicMessages,
}

impl Api {
    /// The API a request is for, or `None` for a call that reports no usage (counted as a
    /// request only).
    pub fn detect(method: &http::Method, path: &str) -> Option<Api> {
        if method != http::Method::POST {
            return None;
        }
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") || path.ends_with("/completions") || path.ends_with("/embeddings") {
            Some(Api::ChatCompletions)
        } else if path.ends_with("/responses") {
            Some(Api::Responses)
        } else if path.ends_with("/messages") && !path.contains("/threads/") {
            // (OpenAI's Assistants API posts to `/threads/{id}/messages`, which reports no usage.)
            Some(Api::AnthropicMessages)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Api::ChatCompletions => "openai.chat",
            Api::Responses => "openai.responses",
            Api::AnthropicMessages => "anthropic.messages",
        }
    }
}

/// Tokens one call used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

impl Usage {
    /// What these tokens cost at `price`, in micro-USD (integers, so Redis adds them exactly).
    pub fn cost_micro_usd(&self, price: &crate::config::budget::Price) -> u64 {
        // Price per million tokens × tokens = micro-USD.
        let micros = price.input * self.input_tokens as f64
            + price.output * self.output_tokens as f64
            + price.cache_read * self.cache_read_tokens as f64
            + price.cache_write * self.cache_write_tokens as f64;
        micros.ceil() as u64
    }
}

impl Usage {
    pub fn total(&self) -> u64 {
        // Saturating: the figures are the upstream's, and a hostile one may send anything.
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_tokens)
    }
}

/// What the request says about its call: the model, the most output it allows, whether it
/// streams, and the rewritten body when keyward asked for usage in a chat stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFacts {
    pub model: Option<String>,
    /// `max_tokens`, `max_completion_tokens` or `max_output_tokens`.
    pub max_output_tokens: Option<u64>,
    /// How many answers the request asks for (`n`, `best_of`): its output is reserved that many
    /// times. At least 1.
    pub completions: u64,
    pub stream: bool,
    /// The body with `stream_options.include_usage = true` added, when a streamed chat
    /// completion did not ask for usage; its extra chunk is taken out of the answer again.
    pub rewritten: Option<Bytes>,
}

/// A model name as keyward keeps it (for the audit record and pricing): at most 128 characters,
/// since a request can name anything.
pub fn model_name(model: &str) -> String {
    model.chars().take(128).collect()
}

/// `text` with the agent's key replaced by `[agent-key]`: a model name is the agent's text, and
/// it goes into the audit record, where the key never may.
pub fn without_key(text: String, key: Option<&str>) -> String {
    match key {
        Some(key) if key.len() >= crate::outbound::MIN_SEARCHED_KEY_LEN && text.contains(key) => {
            text.replace(key, "[agent-key]")
        }
        _ => text,
    }
}

/// Reads what metering needs from a JSON request body; `add_stream_usage` lets keyward ask a
/// streamed chat completion for its usage. A body that is not a JSON object tells nothing (and
/// is forwarded as it is).
pub fn read_request(api: Api, body: &[u8], add_stream_usage: bool) -> RequestFacts {
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(body) else { return RequestFacts::default() };
    let number = |key: &str| object.get(key).and_then(Value::as_u64);
    // The largest of the limits present: an upstream that reads another field than OpenAI does
    // must not make the reservation smaller than what it may produce.
    let max_output_tokens =
        ["max_completion_tokens", "max_tokens", "max_output_tokens"].into_iter().filter_map(number).max();
    // `n` (and the legacy `best_of`) answers are produced for one request.
    let completions = ["n", "best_of"].into_iter().filter_map(number).max().unwrap_or(1).clamp(1, MAX_COMPLETIONS);
    let model = object.get("model").and_then(Value::as_str).map(model_name);
    let stream = object.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut rewritten = None;
    if api == Api::ChatCompletions && stream && add_stream_usage {
        let asked =
            object.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
        if !asked {
            let options = object.entry("stream_options").or_insert(Value::Null);
            if options.is_null() {
                *options = Value::Object(Default::default());
            }
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), Value::Bool(true));
                rewritten = serde_json::to_vec(&Value::Object(object)).ok().map(Bytes::from);
            }
        }
    }
    RequestFacts { model, max_output_tokens, completions, stream, rewritten }
}

/// What the meter does with one finished stream event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// The usage chunk keyward asked for: the agent did not.
    Drop,
    /// A chunk that carries `"usage":null` only because keyward asked for usage: sent without it.
    WithoutNullUsage,
}

/// What `include_usage` adds to every other chunk, as OpenAI writes it.
const NULL_USAGE: &[u8] = b",\"usage\":null";

/// Reads usage from one answer as its (decoded) bytes pass through `push`.
pub struct UsageMeter {
    api: Api,
    sse: bool,
    /// Take the usage chunk out again (keyward added `include_usage`).
    strip_usage_chunk: bool,
    /// Estimate output tokens as content events pass (for a mid-stream cut-off).
    estimate_output: bool,
    /// The unfinished event (SSE), or the copy of the answer (JSON).
    held: BytesMut,
    json_overflow: bool,
    /// A stream's unfinished event outgrew `MAX_HELD_EVENT`: bytes now pass straight through.
    sse_overflow: bool,
    usage: Usage,
    /// The answer reported its final usage.
    complete: bool,
    model: Option<String>,
    output_estimate: u64,
}

impl UsageMeter {
    pub fn new(api: Api, sse: bool, strip_usage_chunk: bool, estimate_output: bool) -> UsageMeter {
        UsageMeter {
            api,
            sse,
            strip_usage_chunk: strip_usage_chunk && sse,
            estimate_output,
            held: BytesMut::new(),
            json_overflow: false,
            sse_overflow: false,
            usage: Usage::default(),
            complete: false,
            model: None,
            output_estimate: 0,
        }
    }

    /// The usage the answer reported, once it has (`None` until then, or if it never did).
    pub fn usage(&self) -> Option<Usage> {
        self.complete.then_some(self.usage)
    }

    /// What is known so far: a stream cut off after Anthropic's `message_start` knows its input.
    pub fn partial(&self) -> Usage {
        let mut usage = self.usage;
        usage.output_tokens = usage.output_tokens.max(self.output_estimate);
        usage
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Output tokens estimated from the content events so far (about four bytes a token, at
    /// least one per event), when estimating is on.
    pub fn output_estimate(&self) -> u64 {
        self.output_estimate
    }

    /// Takes in the next bytes of the answer; returns what goes on to the agent now. For a
    /// stream, `cut` is asked after each complete event whether the stream ends there; the
    /// second value says it did (the rest is never sent).
    pub fn push(&mut self, data: Bytes, cut: &mut dyn FnMut(&UsageMeter) -> bool) -> (Bytes, bool) {
        if !self.sse {
            if !self.json_overflow {
                if self.held.len() + data.len() > MAX_JSON_COPY {
                    self.json_overflow = true;
                    self.held = BytesMut::new();
                } else {
                    self.held.extend_from_slice(&data);
                }
            }
            return (data, false);
        }
        if self.sse_overflow {
            return (data, false);
        }
        if self.held.len() + data.len() > MAX_HELD_EVENT {
            self.sse_overflow = true;
            let mut all = std::mem::take(&mut self.held);
            all.extend_from_slice(&data);
            return (all.freeze(), false);
        }
        if self.held.is_empty() {
            // The common case: no unfinished event before this chunk. Complete events that are
            // all kept go on as the very same bytes.
            let (kept, end, cut_here) = self.events(&data, cut);
            if !cut_here && kept.is_none() {
                self.held.extend_from_slice(&data[end..]);
                return (data.slice(..end), false);
            }
            if cut_here {
                return (kept.unwrap_or_else(|| data.slice(..end)), true);
            }
            self.held.extend_from_slice(&data[end..]);
            return (kept.unwrap_or_default(), false);
        }
        self.held.extend_from_slice(&data);
        let buffer = std::mem::take(&mut self.held).freeze();
        let (kept, end, cut_here) = self.events(&buffer, cut);
        if !cut_here {
            self.held.extend_from_slice(&buffer[end..]);
        }
        (kept.unwrap_or_else(|| buffer.slice(..end)), cut_here)
    }

    /// Handles the complete events at the start of `data`. Returns the bytes to send when they
    /// differ from `data[..end]` (an event was dropped or edited), where the complete events end,
    /// and whether the stream is cut after the last one handled.
    fn events(&mut self, data: &Bytes, cut: &mut dyn FnMut(&UsageMeter) -> bool) -> (Option<Bytes>, usize, bool) {
        let mut start = 0;
        let mut line_start = 0;
        let mut rewritten: Option<BytesMut> = None;
        let mut event_type: Option<(usize, usize)> = None;
        let mut data_lines: Vec<(usize, usize)> = Vec::new();
        for newline in memchr::memchr_iter(b'\n', data) {
            let mut line = &data[line_start..newline];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            let this_line = line_start;
            line_start = newline + 1;
            if !line.is_empty() {
                if let Some(rest) = line.strip_prefix(b"event:") {
                    let offset = this_line + 6 + usize::from(rest.first() == Some(&b' '));
                    event_type = Some((offset, this_line + line.len()));
                } else if let Some(rest) = line.strip_prefix(b"data:") {
                    let offset = this_line + 5 + usize::from(rest.first() == Some(&b' '));
                    data_lines.push((offset, this_line + line.len()));
                }
                continue;
            }
            // A blank line ends the event `data[start..line_start]`.
            let end = line_start;
            let kind = event_type.take().map(|(a, b)| &data[a..b]);
            let verdict = self.event(kind, data, &data_lines);
            data_lines.clear();
            let event = &data[start..end];
            match verdict {
                Verdict::Keep => {
                    if let Some(out) = rewritten.as_mut() {
                        out.extend_from_slice(event);
                    }
                }
                Verdict::Drop => {
                    rewritten.get_or_insert_with(|| BytesMut::from(&data[..start]));
                }
                Verdict::WithoutNullUsage => {
                    let out = rewritten.get_or_insert_with(|| BytesMut::from(&data[..start]));
                    match memchr::memmem::find(event, NULL_USAGE) {
                        Some(at) => {
                            out.extend_from_slice(&event[..at]);
                            out.extend_from_slice(&event[at + NULL_USAGE.len()..]);
                        }
                        None => out.extend_from_slice(event),
                    }
                }
            }
            start = end;
            if cut(self) {
                return (rewritten.map(BytesMut::freeze), start, true);
            }
        }
        (rewritten.map(BytesMut::freeze), start, false)
    }

    /// Reads one event; `data_lines` are the spans of its `data:` values.
    fn event(&mut self, kind: Option<&[u8]>, data: &Bytes, data_lines: &[(usize, usize)]) -> Verdict {
        let payload: std::borrow::Cow<[u8]> = match data_lines {
            [] => return Verdict::Keep,
            [(a, b)] => std::borrow::Cow::Borrowed(&data[*a..*b]),
            many => std::borrow::Cow::Owned(many.iter().map(|(a, b)| &data[*a..*b]).collect::<Vec<_>>().join(&b'\n')),
        };
        let has_usage = usage_object_in(&payload);
        if !has_usage && self.strip_usage_chunk && memchr::memmem::find(&payload, NULL_USAGE).is_some() {
            if self.estimate_output {
                self.estimate(&payload);
            }
            return Verdict::WithoutNullUsage;
        }
        let completed = kind
            .is_some_and(|k| k == b"response.completed" || k == b"response.incomplete" || k == b"response.failed")
            || (self.api == Api::Responses && memchr::memmem::find(&payload, b"\"response.completed\"").is_some());
        if self.estimate_output && !has_usage {
            self.estimate(&payload);
        }
        if !has_usage && !completed {
            return Verdict::Keep;
        }
        let Ok(value) = serde_json::from_slice::<Value>(&payload) else { return Verdict::Keep };
        if self.estimate_output {
            self.estimate_value(&value);
        }
        match self.api {
            Api::ChatCompletions => match value.get("usage") {
                Some(usage) if usage.is_object() => {
                    self.usage = openai_chat_usage(usage);
                    self.complete = true;
                    self.take_model(&value);
                    let no_choices = value.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
                    if self.strip_usage_chunk && no_choices {
                        return Verdict::Drop;
                    }
                    Verdict::Keep
                }
                Some(Value::Null) if self.strip_usage_chunk => Verdict::WithoutNullUsage,
                _ => Verdict::Keep,
            },
            Api::Responses => {
                if let Some(response) = value.get("response")
                    && let Some(usage) = response.get("usage").filter(|u| u.is_object())
                {
                    self.usage = responses_usage(usage);
                    self.complete = true;
                    self.take_model(response);
                }
                Verdict::Keep
            }
            Api::AnthropicMessages => {
                match value.get("type").and_then(Value::as_str) {
                    Some("message_start") => {
                        if let Some(message) = value.get("message") {
                            self.take_model(message);
                            if let Some(usage) = message.get("usage") {
                                self.usage = anthropic_usage(usage, Usage::default());
                            }
                        }
                    }
                    Some("message_delta") => {
                        if let Some(usage) = value.get("usage") {
                            // Counts in `message_delta` are cumulative: they replace the start's.
                            self.usage = anthropic_usage(usage, self.usage);
                            self.complete = true;
                        }
                    }
                    _ => {}
                }
                Verdict::Keep
            }
        }
    }

    fn take_model(&mut self, object: &Value) {
        if let Some(model) = object.get("model").and_then(Value::as_str) {
            self.model = Some(model_name(model));
        }
    }

    fn estimate(&mut self, payload: &[u8]) {
        if payload == b"[DONE]" {
            return;
        }
        if let Ok(value) = serde_json::from_slice::<Value>(payload) {
            self.estimate_value(&value);
        }
    }

    /// Adds the tokens a content event carries: about four bytes of text a token, at least one.
    /// Text, tool-call arguments and reasoning all count as output.
    fn estimate_value(&mut self, value: &Value) {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map_or(0, str::len);
        let bytes = match self.api {
            Api::ChatCompletions => value.pointer("/choices").and_then(Value::as_array).map(|choices| {
                choices
                    .iter()
                    .map(|c| {
                        let delta = c.get("delta");
                        let tools = delta.and_then(|d| d.get("tool_calls")).and_then(Value::as_array);
                        text(delta.and_then(|d| d.get("content")))
                            + text(delta.and_then(|d| d.get("reasoning_content")))
                            + tools.map_or(0, |t| t.iter().map(|t| text(t.pointer("/function/arguments"))).sum())
                    })
                    .sum::<usize>()
            }),
            Api::Responses => value
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| t.ends_with(".delta"))
                .map(|_| text(value.get("delta"))),
            Api::AnthropicMessages => {
                (value.get("type").and_then(Value::as_str) == Some("content_block_delta")).then(|| {
                    let delta = value.get("delta");
                    ["text", "partial_json", "thinking"].iter().map(|k| text(delta.and_then(|d| d.get(*k)))).sum()
                })
            }
        };
        if let Some(bytes) = bytes.filter(|b| *b > 0) {
            self.output_estimate += (bytes as u64).div_ceil(4).max(1);
        }
    }

    /// The answer has ended: a JSON answer's usage is read now. A stream's unfinished event is
    /// returned to be sent (it was not an event, so there is nothing to read in it).
    pub fn finish(&mut self) -> Bytes {
        if self.sse {
            return std::mem::take(&mut self.held).freeze();
        }
        if self.json_overflow {
            return Bytes::new();
        }
        let held = std::mem::take(&mut self.held);
        if let Ok(value) = serde_json::from_slice::<Value>(&held)
            && let Some(usage) = value.get("usage").filter(|u| u.is_object())
        {
            self.usage = match self.api {
                Api::ChatCompletions => openai_chat_usage(usage),
                Api::Responses => responses_usage(usage),
                Api::AnthropicMessages => anthropic_usage(usage, Usage::default()),
            };
            self.complete = true;
            self.take_model(&value);
        }
        Bytes::new()
    }
}

/// Whether `"usage"` is followed by an object somewhere in the payload: a cheap test before
/// any JSON is parsed (most events carry no usage, or `"usage":null`).
fn usage_object_in(payload: &[u8]) -> bool {
    memchr::memmem::find_iter(payload, b"\"usage\"")
        .any(|at| payload[at + 7..].iter().copied().find(|b| !b.is_ascii_whitespace() && *b != b':') == Some(b'{'))
}

fn count(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer).and_then(Value::as_u64)
}

/// Chat Completions: `prompt_tokens` include `prompt_tokens_details.cached_tokens`.
fn openai_chat_usage(usage: &Value) -> Usage {
    let prompt = count(usage, "/prompt_tokens").unwrap_or(0);
    let cached = count(usage, "/prompt_tokens_details/cached_tokens").unwrap_or(0).min(prompt);
    Usage {
        input_tokens: prompt - cached,
        output_tokens: count(usage, "/completion_tokens").unwrap_or(0),
        cache_read_tokens: cached,
        cache_write_tokens: 0,
    }
}

/// Responses: `input_tokens` include `input_tokens_details.cached_tokens`.
fn responses_usage(usage: &Value) -> Usage {
    let input = count(usage, "/input_tokens").unwrap_or(0);
    let cached = count(usage, "/input_tokens_details/cached_tokens").unwrap_or(0).min(input);
    Usage {
        input_tokens: input - cached,
        output_tokens: count(usage, "/output_tokens").unwrap_or(0),
        cache_read_tokens: cached,
        cache_write_tokens: 0,
    }
}

/// Anthropic: input, cache creation and cache read are reported apart; a field absent from a
/// `message_delta` keeps the value `message_start` gave.
fn anthropic_usage(usage: &Value, before: Usage) -> Usage {
    Usage {
        input_tokens: count(usage, "/input_tokens").unwrap_or(before.input_tokens),
        output_tokens: count(usage, "/output_tokens").unwrap_or(before.output_tokens),
        cache_read_tokens: count(usage, "/cache_read_input_tokens").unwrap_or(before.cache_read_tokens),
        cache_write_tokens: count(usage, "/cache_creation_input_tokens").unwrap_or(before.cache_write_tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(meter: &mut UsageMeter, chunks: &[&str]) -> String {
        let mut out = Vec::new();
        for chunk in chunks {
            let (sent, _) = meter.push(Bytes::copy_from_slice(chunk.as_bytes()), &mut |_| false);
            out.extend_from_slice(&sent);
        }
        out.extend_from_slice(&meter.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn chat_json_usage_takes_cached_tokens_out_of_input() {
        let mut meter = UsageMeter::new(Api::ChatCompletions, false, false, false);
        let body = r#"{"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":100,"completion_tokens":7,"total_tokens":107,"prompt_tokens_details":{"cached_tokens":60}}}"#;
        assert_eq!(run(&mut meter, &[&body[..20], &body[20..]]), body);
        assert_eq!(
            meter.usage(),
            Some(Usage { input_tokens: 40, output_tokens: 7, cache_read_tokens: 60, cache_write_tokens: 0 })
        );
        assert_eq!(meter.model(), Some("gpt-4o-2024-08-06"));
    }

    #[test]
    fn chat_stream_usage_chunk_is_read_across_chunk_boundaries_and_dropped_when_keyward_asked() {
        let events = [
            "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
            "data: [DONE]\n\n",
        ];
        let whole = events.concat();
        // Every split point: the meter sees the same usage and sends the same bytes.
        for split in 1..whole.len() {
            let mut meter = UsageMeter::new(Api::ChatCompletions, true, false, false);
            assert_eq!(run(&mut meter, &[&whole[..split], &whole[split..]]), whole, "split at {split}");
            assert_eq!(meter.usage().unwrap().total(), 7);
            let mut meter = UsageMeter::new(Api::ChatCompletions, true, true, false);
            let sent = run(&mut meter, &[&whole[..split], &whole[split..]]);
            let without_null = events[0].replace(",\"usage\":null", "");
            assert_eq!(sent, format!("{without_null}{}", events[2]), "split at {split}");
            assert_eq!(meter.usage().unwrap().output_tokens, 2);
        }
    }

    #[test]
    fn an_event_that_never_ends_stops_metering_and_passes_through() {
        let mut meter = UsageMeter::new(Api::ChatCompletions, true, false, false);
        let line = "data: ".to_string() + &"x".repeat(64 << 10);
        let mut sent = 0;
        let mut pushed = 0;
        for _ in 0..40 {
            pushed += line.len();
            sent += meter.push(Bytes::from(line.clone()), &mut |_| false).0.len();
        }
        sent += meter.finish().len();
        assert_eq!(sent, pushed, "every byte reaches the agent");
        assert!(meter.held.len() <= MAX_HELD_EVENT, "nothing beyond the cap is held");
        assert!(meter.usage().is_none());
    }

    #[test]
    fn responses_stream_reads_the_completed_event() {
        let mut meter = UsageMeter::new(Api::Responses, true, false, false);
        let stream = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
                      event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
                      event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":11,\"input_tokens_details\":{\"cached_tokens\":1},\"output_tokens\":3,\"total_tokens\":14}}}\n\n";
        assert_eq!(run(&mut meter, &[stream]), stream);
        assert_eq!(
            meter.usage(),
            Some(Usage { input_tokens: 10, output_tokens: 3, cache_read_tokens: 1, cache_write_tokens: 0 })
        );
        assert_eq!(meter.model(), Some("gpt-4.1"));
    }

    #[test]
    fn anthropic_stream_adds_message_start_and_message_delta_with_cache_tokens() {
        let mut meter = UsageMeter::new(Api::AnthropicMessages, true, false, false);
        let stream = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":10,\"cache_read_input_tokens\":30,\"output_tokens\":1}}}\r\n\r\n\
                      event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\r\n\r\n";
        run(&mut meter, &[stream]);
        assert_eq!(meter.usage(), None, "no message_delta yet");
        assert_eq!(meter.partial().input_tokens, 25);
        let end = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n";
        run(&mut meter, &[end]);
        assert_eq!(
            meter.usage(),
            Some(Usage { input_tokens: 25, output_tokens: 15, cache_read_tokens: 30, cache_write_tokens: 10 })
        );
        assert_eq!(meter.model(), Some("claude-sonnet-4-5"));
    }

    #[test]
    fn anthropic_json_usage() {
        let mut meter = UsageMeter::new(Api::AnthropicMessages, false, false, false);
        run(
            &mut meter,
            &[
                r#"{"model":"claude-fake","usage":{"input_tokens":5,"output_tokens":7,"cache_creation_input_tokens":2,"cache_read_input_tokens":3}}"#,
            ],
        );
        assert_eq!(meter.usage().unwrap().total(), 17);
    }

    #[test]
    fn output_is_estimated_from_text_tool_arguments_and_thinking() {
        let mut meter = UsageMeter::new(Api::ChatCompletions, true, false, true);
        let chat = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]}}]}\n\n";
        run(&mut meter, &[chat]);
        assert_eq!(meter.output_estimate(), 5, "18 bytes of arguments");
        let mut meter = UsageMeter::new(Api::AnthropicMessages, true, false, true);
        let thinking = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Let me see.\"}}\n\n";
        run(&mut meter, &[thinking]);
        assert_eq!(meter.output_estimate(), 3);
        let asked_null = read_request(Api::ChatCompletions, br#"{"stream":true,"stream_options":null}"#, true);
        let rewritten: Value = serde_json::from_slice(&asked_null.rewritten.unwrap()).unwrap();
        assert_eq!(rewritten["stream_options"]["include_usage"], true);
    }

    #[test]
    fn a_cut_ends_the_stream_after_a_whole_event() {
        let mut meter = UsageMeter::new(Api::ChatCompletions, true, false, true);
        let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"}}]}\n\n";
        let chunk = event.repeat(5);
        let (sent, cut) = meter.push(Bytes::from(chunk), &mut |m| m.output_estimate() >= 3);
        assert!(cut);
        assert_eq!(std::str::from_utf8(&sent).unwrap(), event.repeat(3));
    }

    #[test]
    fn request_facts_and_the_include_usage_rewrite() {
        let many = read_request(
            Api::ChatCompletions,
            br#"{"model":"m","max_completion_tokens":1,"max_tokens":64000,"n":8}"#,
            false,
        );
        assert_eq!((many.max_output_tokens, many.completions), (Some(64000), 8), "the largest limit, n answers");
        let facts = read_request(Api::ChatCompletions, br#"{"model":"gpt-4o","max_tokens":50,"stream":true}"#, true);
        assert_eq!(facts.model.as_deref(), Some("gpt-4o"));
        assert_eq!(facts.max_output_tokens, Some(50));
        let rewritten: Value = serde_json::from_slice(&facts.rewritten.unwrap()).unwrap();
        assert_eq!(rewritten["stream_options"]["include_usage"], true);
        let asked = read_request(
            Api::ChatCompletions,
            br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
            true,
        );
        assert!(asked.rewritten.is_none());
        let responses =
            read_request(Api::Responses, br#"{"model":"gpt-4.1","max_output_tokens":9,"stream":true}"#, true);
        assert_eq!((responses.max_output_tokens, responses.rewritten), (Some(9), None));
        assert_eq!(read_request(Api::AnthropicMessages, b"not json", true), RequestFacts::default());
        let old_azure = read_request(Api::ChatCompletions, br#"{"stream":true}"#, false);
        assert!(old_azure.stream && old_azure.rewritten.is_none());
        assert_eq!(Api::detect(&http::Method::POST, "/v1/chat/completions"), Some(Api::ChatCompletions));
        assert_eq!(Api::detect(&http::Method::GET, "/v1/chat/completions"), None);
        assert_eq!(Api::detect(&http::Method::POST, "/repos/x"), None);
        assert_eq!(Api::detect(&http::Method::POST, "/v1/messages"), Some(Api::AnthropicMessages));
        assert_eq!(Api::detect(&http::Method::POST, "/v1/threads/thread_1/messages"), None);
        assert_eq!(Api::detect(&http::Method::POST, "/v1/messages/count_tokens"), None);
        let key = "kw_agentKeyThatMustNeverBeRecorded";
        assert_eq!(without_key(format!("gpt-{key}"), Some(key)), "gpt-[agent-key]");
        assert_eq!(without_key("gpt-4o".into(), Some(key)), "gpt-4o");
    }
}
