//! Removes credential bytes from response headers and streamed response bodies.
//!
//! Every credential keyward holds is searched for in its raw form and in the encodings an
//! upstream might echo it in, each produced the way the encoders ecosystems use produce it:
//! base64 (at all three alignments, standard and URL-safe, and MIME/PEM-wrapped at every line
//! position), percent-encoding (with the safe characters of Python, JavaScript, Go, PHP, Java and
//! WHATWG forms, and `%XX` on every byte), JSON escaping (including Go's `\u003c`-style HTML
//! escaping and `\uHHHH` on every character), HTML escaping and numeric entities, hex and
//! UTF-16LE/BE. A match is replaced by a mask of the same length (`[REDACTED:NAME]` padded with
//! `*`), so `Content-Length` stays true. Header names that hold a credential are dropped.
//!
//! Streaming keeps back only the shortest tail that could still be the start of a pattern, so a
//! value split across chunks is caught, yet an SSE event ending in "\n\n" is passed on at once.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aho_corasick::automaton::Automaton;
use aho_corasick::nfa::contiguous;
use aho_corasick::{Anchored, Input, Match, MatchKind};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroize;

mod starts;
use starts::Starts;

/// Values shorter than this are not scrubbed: masking every occurrence of a short string would
/// corrupt ordinary responses. keyward logs a warning for such secrets.
pub const MIN_SCRUB_LEN: usize = 8;

/// A compiled set of credential patterns. Deliberately not `Debug`: it holds secret bytes.
pub struct Scrubber {
    /// Every pattern, leftmost-longest. A contiguous NFA (what aho-corasick picks anyway for
    /// hundreds of patterns), used directly so that the same trie also answers, walked anchored
    /// from a byte, whether a chunk's tail could still grow into a pattern.
    automaton: Option<Patterns>,
    /// Finds every pattern and its JSON-escaped form: if it finds nothing in a serialized JSON
    /// document, no string in that document holds a pattern.
    in_json: Option<Patterns>,
    masks: Vec<Vec<u8>>,
    first_bytes: [bool; 256],
    longest: usize,
}

/// A mask as long as `pattern`; line breaks stay where they were, so wrapped text keeps its lines.
fn mask(name: &str, pattern: &[u8]) -> Vec<u8> {
    let label = format!("[REDACTED:{name}]");
    let mut out = if label.len() <= pattern.len() { label.into_bytes() } else { Vec::new() };
    out.resize(pattern.len(), b'*');
    for (byte, original) in out.iter_mut().zip(pattern) {
        if matches!(original, b'\r' | b'\n') {
            *byte = *original;
        }
    }
    out
}

/// The contiguous base64 text that appears whenever `value` is base64-encoded starting at any
/// byte offset: for each alignment, the characters fully determined by `value` alone.
fn base64_fragments(value: &[u8], engine: &base64::engine::GeneralPurpose) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for offset in 0..3usize {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(value);
        let encoded = engine.encode(&padded);
        // Characters touching the padding bytes depend on neighbours; so do the trailing ones.
        let skip = if offset == 0 { 0 } else { (offset * 8).div_ceil(6) };
        let usable_bits = (offset + value.len()) * 8;
        let keep = usable_bits / 6;
        if keep > skip {
            let fragment = encoded.as_bytes()[skip..keep].to_vec();
            if fragment.len() >= MIN_SCRUB_LEN {
                out.push(fragment);
            }
        }
    }
    out
}

/// Line-wrapped base64: MIME (RFC 2045, Python `base64.encodebytes`, coreutils `base64`) breaks
/// lines at 76 characters with CRLF or LF, PEM and `openssl base64` at 64 with LF.
const BASE64_WRAPPING: [(usize, &[u8]); 3] = [(76, b"\r\n"), (76, b"\n"), (64, b"\n")];

/// `fragment` as it appears in wrapped base64, for every position of the first line break
/// inside it: the encoding may start anywhere on a line, so every phase is possible.
fn wrapped(fragment: &[u8], width: usize, eol: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for first in 1..=width.min(fragment.len().saturating_sub(1)) {
        let mut form = fragment[..first].to_vec();
        let mut at = first;
        while at < fragment.len() {
            let end = (at + width).min(fragment.len());
            form.extend_from_slice(eol);
            form.extend_from_slice(&fragment[at..end]);
            at = end;
        }
        out.push(form);
    }
    out
}

/// RFC 3986 unreserved characters: Python `quote(s, safe='')`, Go `url.QueryEscape`, PHP
/// `rawurlencode`, .NET `Uri.EscapeDataString`.
const URL_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// The percent-encoders ecosystems use, as the characters each leaves unencoded (ASCII letters
/// and digits always are); each is also tried with a space as `+` (form encoding).
const URL_ENCODERS: [&AsciiSet; 9] = [
    // Rust `percent_encoding::NON_ALPHANUMERIC`, curl `--data-urlencode`.
    NON_ALPHANUMERIC,
    URL_UNRESERVED,
    // Python `quote(s)` (safe='/').
    &URL_UNRESERVED.remove(b'/'),
    // JavaScript `encodeURIComponent`.
    &URL_UNRESERVED.remove(b'!').remove(b'*').remove(b'\'').remove(b'(').remove(b')'),
    // JavaScript `encodeURI`.
    &URL_UNRESERVED
        .remove(b'!')
        .remove(b'*')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b';')
        .remove(b',')
        .remove(b'/')
        .remove(b'?')
        .remove(b':')
        .remove(b'@')
        .remove(b'&')
        .remove(b'=')
        .remove(b'+')
        .remove(b'$')
        .remove(b'#'),
    // JavaScript's legacy `escape`.
    &NON_ALPHANUMERIC.remove(b'@').remove(b'*').remove(b'_').remove(b'+').remove(b'-').remove(b'.').remove(b'/'),
    // WHATWG `application/x-www-form-urlencoded` (URLSearchParams), Java `URLEncoder`.
    &NON_ALPHANUMERIC.remove(b'*').remove(b'-').remove(b'.').remove(b'_'),
    // PHP `urlencode`.
    &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_'),
    // Go `url.PathEscape`.
    &URL_UNRESERVED
        .remove(b'$')
        .remove(b'&')
        .remove(b'+')
        .remove(b',')
        .remove(b'/')
        .remove(b':')
        .remove(b';')
        .remove(b'=')
        .remove(b'@'),
];

fn percent_forms(value: &str, forms: &mut Vec<Vec<u8>>) {
    for set in URL_ENCODERS {
        let encoded = utf8_percent_encode(value, set).to_string();
        forms.push(encoded.replace("%20", "+").into_bytes());
        forms.push(encoded.into_bytes());
    }
    // `%XX` on every byte, letters and digits included.
    forms.push(value.bytes().flat_map(|b| format!("%{b:02X}").into_bytes()).collect());
}

/// The JSON string body (without quotes) as serde_json, `JSON.stringify` and Python write it,
/// then with the optional escapes other encoders add: `\/` (PHP), `<>&` as `\u003c` (Go), `'`
/// and `"` as `\u0027`/`\u0022` (PHP `JSON_HEX_*`), non-ASCII as `\uHHHH` (Python), and every
/// character as `\uHHHH`.
fn json_forms(value: &str, forms: &mut Vec<Vec<u8>>) {
    let plain = serde_json::to_string(value).expect("strings serialize");
    let plain = &plain[1..plain.len() - 1];
    let go = plain.replace('&', "\\u0026").replace('<', "\\u003c").replace('>', "\\u003e");
    let hex_all = go.replace('\'', "\\u0027").replace("\\\"", "\\u0022");
    let ascii: String = plain
        .chars()
        .map(|c| if c.is_ascii() { c.to_string() } else { utf16_escapes(&c.to_string(), "\\u", "") })
        .collect();
    for form in [plain, &go, &hex_all, &ascii] {
        forms.push(form.as_bytes().to_vec());
        forms.push(form.replace('/', "\\/").into_bytes());
    }
    forms.push(utf16_escapes(value, "\\u", "").into_bytes());
}

fn utf16_escapes(value: &str, before: &str, after: &str) -> String {
    value.encode_utf16().map(|unit| format!("{before}{unit:04x}{after}")).collect()
}

/// HTML text escaping (Python `html.escape`, Go `html.EscapeString`, PHP `htmlspecialchars`,
/// MarkupSafe) and numeric character references on every character, decimal and hex.
fn html_forms(value: &str, forms: &mut Vec<Vec<u8>>) {
    let base = value.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    // Quotes left as they are: Python `html.escape(s, quote=False)`, XML text nodes.
    forms.push(base.clone().into_bytes());
    for (quot, apos) in [("&quot;", "&#x27;"), ("&#34;", "&#39;"), ("&quot;", "&#039;"), ("&quot;", "&#39;")] {
        forms.push(base.replace('"', quot).replace('\'', apos).into_bytes());
    }
    forms.push(value.chars().flat_map(|c| format!("&#{};", c as u32).into_bytes()).collect());
    forms.push(value.chars().flat_map(|c| format!("&#x{:x};", c as u32).into_bytes()).collect());
}

/// Every form of `value` the scrubber searches for. Hex digits and percent escapes are matched
/// case-insensitively, so lower- and upper-case hex are one pattern each.
fn variants(value: &str) -> Vec<Vec<u8>> {
    let mut forms: Vec<Vec<u8>> = vec![value.as_bytes().to_vec()];
    percent_forms(value, &mut forms);
    json_forms(value, &mut forms);
    html_forms(value, &mut forms);
    forms.push(value.bytes().flat_map(|b| format!("{b:02x}").into_bytes()).collect());
    forms.push(value.encode_utf16().flat_map(u16::to_le_bytes).collect());
    forms.push(value.encode_utf16().flat_map(u16::to_be_bytes).collect());
    let standard = base64_fragments(value.as_bytes(), &base64::engine::general_purpose::STANDARD);
    for fragment in &standard {
        for (width, eol) in BASE64_WRAPPING {
            forms.extend(wrapped(fragment, width, eol));
        }
        // Base64 in a URL (a Basic credential in a redirect): `+` and `/` percent-encoded.
        let text = std::str::from_utf8(fragment).expect("base64 is ASCII");
        forms.push(utf8_percent_encode(text, NON_ALPHANUMERIC).to_string().into_bytes());
    }
    forms.extend(standard);
    forms.extend(base64_fragments(value.as_bytes(), &base64::engine::general_purpose::URL_SAFE));
    forms.sort();
    forms.dedup();
    forms
}

#[cfg(test)]
fn form_encode(value: &str) -> String {
    utf8_percent_encode(value, NON_ALPHANUMERIC).to_string().replace("%20", "+")
}

impl Scrubber {
    /// A scrubber for `secrets` (name → value). Values shorter than `MIN_SCRUB_LEN` are skipped.
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a SecretString)>) -> Scrubber {
        let mut patterns = Vec::new();
        let mut masks = Vec::new();
        let mut by_pattern: BTreeMap<Vec<u8>, String> = BTreeMap::new();
        for (name, value) in secrets {
            let value = value.expose_secret();
            if value.len() < MIN_SCRUB_LEN {
                continue;
            }
            for form in variants(value) {
                by_pattern.entry(form).or_insert_with(|| name.to_string());
            }
        }
        for (pattern, name) in by_pattern {
            masks.push(mask(&name, &pattern));
            patterns.push(pattern);
        }
        let mut first_bytes = [false; 256];
        for pattern in &patterns {
            first_bytes[pattern[0].to_ascii_lowercase() as usize] = true;
            first_bytes[pattern[0].to_ascii_uppercase() as usize] = true;
        }
        let automaton = (!patterns.is_empty()).then(|| {
            // No prefilter: the patterns' case-insensitive first bytes are common letters and digits,
            // so on text (JSON, SSE, prose) the prefilter stops at almost every byte and restarts
            // the automaton, about 5x slower than scanning every byte with it (measured on 16 KiB
            // of English text: ~155 us against ~31 us). Leftmost-longest keeps every pattern's
            // whole path in the trie (only leftmost-first prunes), so anchored walks see every prefix.
            let automaton = contiguous::Builder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .ascii_case_insensitive(true)
                .prefilter(false)
                .build(&patterns)
                .expect("literal patterns always compile");
            Patterns { automaton, starts: Starts::new(&patterns) }
        });
        let in_json = (!patterns.is_empty()).then(|| {
            // Inside a serialized JSON string a pattern appears only in its escaped form (a raw
            // quote, backslash or line break cannot), so that is the only form searched for.
            let mut escaped: Vec<Vec<u8>> = patterns
                .iter()
                .map(|pattern| match std::str::from_utf8(pattern) {
                    Ok(text) => {
                        let json = serde_json::to_string(text).expect("strings serialize");
                        json.as_bytes()[1..json.len() - 1].to_vec()
                    }
                    Err(_) => pattern.clone(),
                })
                .collect();
            escaped.sort();
            escaped.dedup();
            let automaton = contiguous::Builder::new()
                .ascii_case_insensitive(true)
                .prefilter(false)
                .build(&escaped)
                .expect("literal patterns always compile");
            let built = Patterns { automaton, starts: Starts::new(&escaped) };
            escaped.iter_mut().for_each(|p| p.zeroize());
            built
        });
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        patterns.iter_mut().for_each(|p| p.zeroize());
        Scrubber { automaton, in_json, masks, first_bytes, longest }
    }

    pub fn empty() -> Scrubber {
        Scrubber::new(std::iter::empty())
    }

    pub fn is_empty(&self) -> bool {
        self.automaton.is_none()
    }

    /// Scrubs a complete buffer.
    pub fn scrub<'a>(&self, input: &'a [u8]) -> Cow<'a, [u8]> {
        let Some(automaton) = &self.automaton else { return Cow::Borrowed(input) };
        let mut iter = automaton.matches(input).peekable();
        if iter.peek().is_none() {
            return Cow::Borrowed(input);
        }
        let mut out = input.to_vec();
        for m in iter {
            out[m.start()..m.end()].copy_from_slice(&self.masks[m.pattern().as_usize()]);
        }
        Cow::Owned(out)
    }

    /// Whether the serialized JSON `document` may hold a credential in one of its strings (in
    /// any form `scrub_json` removes). `false` means `scrub_json` would change nothing.
    pub fn may_appear_in_json(&self, document: &[u8]) -> bool {
        self.in_json.as_ref().is_some_and(|in_json| in_json.find_at(document, 0).is_some())
    }

    /// Scrubs every string inside a JSON value in place.
    pub fn scrub_json(&self, value: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match value {
            serde_json::Value::String(text) => {
                if let Cow::Owned(clean) = self.scrub(text.as_bytes()) {
                    *text = String::from_utf8_lossy(&clean).into_owned();
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.scrub_json(v)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| self.scrub_json(v)),
            _ => {}
        }
    }

    /// Scrubs every header value in place, and drops every header whose name holds a credential
    /// (a name cannot carry a mask: `[` and `:` are not allowed in it).
    pub fn scrub_headers(&self, headers: &mut HeaderMap) {
        let Some(automaton) = &self.automaton else { return };
        if headers.keys().any(|name| automaton.found(name.as_str().as_bytes())) {
            let mut dropped = 0usize;
            let mut current = None;
            for (name, value) in std::mem::take(headers) {
                // `into_iter` names a header once, then yields its further values with `None`.
                if let Some(name) = name {
                    current = (!automaton.found(name.as_str().as_bytes())).then_some(name);
                }
                match &current {
                    Some(name) => {
                        headers.append(name.clone(), value);
                    }
                    None => dropped += 1,
                }
            }
            tracing::warn!(dropped, "dropped upstream response headers whose name held a credential");
        }
        for value in headers.values_mut() {
            if let Cow::Owned(clean) = self.scrub(value.as_bytes()) {
                // The mask is ASCII and the same length, so the value stays valid.
                if let Ok(mut replaced) = HeaderValue::from_bytes(&clean) {
                    replaced.set_sensitive(value.is_sensitive());
                    *value = replaced;
                }
            }
        }
    }

    /// The length of the longest suffix of `buf` that is a proper prefix of some pattern (or a
    /// whole one, which the next chunk or the end of the stream then masks).
    fn holdback(&self, buf: &[u8]) -> usize {
        let Some(Patterns { automaton: prefixes, starts }) = &self.automaton else { return 0 };
        let max = self.longest.saturating_sub(1).min(buf.len());
        let start = prefixes.start_state(Anchored::Yes).expect("anchored searches are supported");
        for at in buf.len() - max..buf.len() {
            if !self.first_bytes[buf[at] as usize] {
                continue;
            }
            // A prefix of `WINDOW` bytes or more starts with some pattern's first window.
            if let Some(filter) = starts
                && buf.len() - at >= starts::WINDOW
                && !filter.may_start_at(buf, at)
            {
                continue;
            }
            let mut state = start;
            let alive = buf[at..].iter().all(|&byte| {
                state = prefixes.next_state(Anchored::Yes, state, byte);
                !prefixes.is_dead(state)
            });
            if alive {
                return buf.len() - at;
            }
        }
        0
    }
}

/// An automaton and the filter of where its patterns may start.
struct Patterns {
    automaton: contiguous::NFA,
    /// `None` only if a pattern is shorter than the filter's window: then every position is tried.
    starts: Option<Starts>,
}

impl Patterns {
    /// The first match starting at or after `from`, leftmost (and longest, for leftmost-longest
    /// automata): the automaton walked anchored from each position the filter lets through.
    fn find_at(&self, haystack: &[u8], from: usize) -> Option<Match> {
        let search = |input: Input<'_>| self.automaton.try_find(&input).expect("NFA searches cannot fail");
        let Some(starts) = &self.starts else { return search(Input::new(haystack).range(from..)) };
        let mut at = from;
        while let Some(start) = starts.next(haystack, at) {
            if let Some(found) = search(Input::new(haystack).range(start..).anchored(Anchored::Yes)) {
                return Some(found);
            }
            at = start + 1;
        }
        None
    }

    /// The leftmost-longest, non-overlapping matches in `haystack`.
    fn matches<'h>(&self, haystack: &'h [u8]) -> impl Iterator<Item = Match> + use<'_, 'h> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let found = self.find_at(haystack, at)?;
            at = found.end();
            Some(found)
        })
    }

    fn found(&self, haystack: &[u8]) -> bool {
        self.find_at(haystack, 0).is_some()
    }
}

/// Scrubs a stream of chunks, keeping back only a possible partial match.
pub struct StreamScrubber {
    scrubber: Arc<Scrubber>,
    tail: Vec<u8>,
}

impl StreamScrubber {
    pub fn new(scrubber: Arc<Scrubber>) -> StreamScrubber {
        StreamScrubber { scrubber, tail: Vec::new() }
    }

    /// Scrubs the next chunk; returns what can be released now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.push_bytes(Bytes::copy_from_slice(chunk))
    }

    /// Like `push`, but hands a clean chunk back without copying it (the common case).
    pub fn push_bytes(&mut self, chunk: Bytes) -> Bytes {
        let Some(automaton) = &self.scrubber.automaton else { return chunk };
        if self.tail.is_empty() && !automaton.found(&chunk) && self.scrubber.holdback(&chunk) == 0 {
            return chunk;
        }
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(&chunk);
        let safe = buf.len() - self.scrubber.holdback(&buf);
        let mut released_to = safe;
        let matches: Vec<_> = automaton.matches(&buf).take_while(|m| m.start() < safe).collect();
        for m in matches {
            // A match starting before `safe` is final: any longer pattern starting there would
            // have made that position part of the held-back tail.
            buf[m.start()..m.end()].copy_from_slice(&self.scrubber.masks[m.pattern().as_usize()]);
            released_to = released_to.max(m.end());
        }
        self.tail = buf.split_off(released_to);
        Bytes::from(buf)
    }

    /// Releases whatever is held back at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        let tail = std::mem::take(&mut self.tail);
        Bytes::from(self.scrubber.scrub(&tail).into_owned())
    }
}

/// A response body passed through a `StreamScrubber`.
pub struct ScrubbedBody<B> {
    inner: B,
    scrubber: StreamScrubber,
    done: bool,
}

impl<B> ScrubbedBody<B> {
    pub fn new(inner: B, scrubber: Arc<Scrubber>) -> ScrubbedBody<B> {
        ScrubbedBody { inner, scrubber: StreamScrubber::new(scrubber), done: false }
    }
}

impl<B> Body for ScrubbedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let mut out = this.scrubber.push_bytes(data);
                        if this.inner.is_end_stream() {
                            this.done = true;
                            let rest = this.scrubber.finish();
                            if !rest.is_empty() {
                                let mut joined = out.to_vec();
                                joined.extend_from_slice(&rest);
                                out = Bytes::from(joined);
                            }
                        }
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    // Trailers are headers too; they are dropped rather than risk an echo.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.scrubber.finish();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.inner.is_end_stream() && self.scrubber.tail.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        // Masks have the same length as what they replace.
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const SECRET: &str = "sk-canary-ABCdef123/+xyz-0123456789";

    fn scrubber() -> Arc<Scrubber> {
        let value = SecretString::from(SECRET);
        Arc::new(Scrubber::new([("OPENAI_API_KEY", &value)]))
    }

    fn encodings() -> Vec<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        vec![
            SECRET.to_string(),
            b64.encode(SECRET),
            b64.encode(format!("Bearer {SECRET}")),
            b64.encode(format!("x:{SECRET}")),
            b64.encode(format!("xy:{SECRET}")),
            base64::engine::general_purpose::URL_SAFE.encode(format!("user:{SECRET}")),
            utf8_percent_encode(SECRET, NON_ALPHANUMERIC).to_string(),
            utf8_percent_encode(SECRET, NON_ALPHANUMERIC).to_string().to_lowercase(),
            form_encode(SECRET),
            serde_json::to_string(SECRET).unwrap(),
            serde_json::to_string(SECRET).unwrap().replace('/', "\\/"),
            SECRET.bytes().map(|b| format!("{b:02X}")).collect(),
            SECRET.bytes().map(|b| format!("%{b:02x}")).collect(),
            SECRET.chars().map(|c| format!("\\u{:04x}", c as u32)).collect(),
            SECRET.encode_utf16().flat_map(u16::to_le_bytes).map(char::from).collect(),
            SECRET.encode_utf16().flat_map(u16::to_be_bytes).map(char::from).collect(),
            {
                let encoded = b64.encode(format!("ab{SECRET}"));
                format!("{}\r\n{}", &encoded[..30], &encoded[30..])
            },
        ]
    }

    #[test]
    fn a_json_document_is_flagged_whenever_scrub_json_would_change_it() {
        // A secret with characters JSON escapes, so its escaped forms differ from its forms.
        let tricky = SecretString::from("sk-\"quoted\\back/slash-0123456789");
        let scrubbers = [scrubber(), Arc::new(Scrubber::new([("TRICKY", &tricky)]))];
        for (s, secret) in scrubbers.iter().zip([SECRET, tricky.expose_secret()]) {
            let mut forms = vec![
                secret.to_string(),
                serde_json::to_string(secret).unwrap(),
                serde_json::to_string(secret).unwrap().replace('/', "\\/"),
                utf8_percent_encode(secret, NON_ALPHANUMERIC).to_string(),
                base64::engine::general_purpose::STANDARD.encode(secret),
            ];
            forms.push(forms[0].to_uppercase());
            for form in forms {
                let document = serde_json::json!({ "path": format!("/v1/{form}/x"), "n": [1, { "s": form }] });
                let mut scrubbed = document.clone();
                s.scrub_json(&mut scrubbed);
                assert_ne!(scrubbed, document, "scrub_json missed {form}");
                assert!(s.may_appear_in_json(&serde_json::to_vec(&document).unwrap()), "not flagged: {form}");
            }
            let clean = serde_json::json!({ "path": "/v1/chat/completions", "agentId": "a" });
            assert!(!s.may_appear_in_json(&serde_json::to_vec(&clean).unwrap()));
        }
        assert!(!Scrubber::empty().may_appear_in_json(SECRET.as_bytes()));
    }

    #[test]
    fn every_encoding_is_masked_with_the_same_length() {
        let s = scrubber();
        for form in encodings() {
            let input = format!("before {form} after");
            let out = s.scrub(input.as_bytes());
            assert_eq!(out.len(), input.len(), "{form}");
            let text = String::from_utf8_lossy(&out);
            assert!(!text.contains(&form), "{form} survived: {text}");
            assert!(text.starts_with("before ") && text.ends_with(" after"), "{text}");
        }
        let out = s.scrub(format!("x {SECRET} y").as_bytes()).into_owned();
        assert_eq!(String::from_utf8(out).unwrap(), "x [REDACTED:OPENAI_API_KEY]********** y");
    }

    #[test]
    fn values_split_across_any_chunking_are_caught() {
        let s = scrubber();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..500 {
            let form = &encodings()[round % encodings().len()];
            let mut body: Vec<u8> = (0..rng.random_range(0..200)).map(|_| rng.random_range(b' '..=b'~')).collect();
            let at = rng.random_range(0..=body.len());
            body.splice(at..at, form.bytes());
            let mut stream = StreamScrubber::new(s.clone());
            let mut out = Vec::new();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(17));
                out.extend_from_slice(&stream.push(&rest[..n]));
                rest = &rest[n..];
            }
            out.extend_from_slice(&stream.finish());
            // Streaming, however chunked, gives exactly what scrubbing the whole body gives.
            assert_eq!(out, s.scrub(&body).into_owned(), "round {round}");
            assert!(!String::from_utf8_lossy(&out).contains(form.as_str()), "round {round}: {form} survived");
        }
    }

    /// The start filter only skips work: with it, matches (where, which pattern, how long), the
    /// held-back tail and the JSON check are exactly what the automata find from every position, on text with
    /// every form of two secrets embedded, in mixed case, overlapping and at the edges.
    #[test]
    fn the_start_filter_finds_exactly_what_a_full_search_finds() {
        let other = SecretString::from("ghp_0123456789abcdefABCDEF0123456789abcd");
        let canary = SecretString::from(SECRET);
        let s = Scrubber::new([("A", &canary), ("B", &other)]);
        let mut unfiltered = Scrubber::new([("A", &canary), ("B", &other)]);
        unfiltered.automaton.as_mut().unwrap().starts = None;
        let main = s.automaton.as_ref().unwrap();
        let json = s.in_json.as_ref().unwrap();
        assert!(main.starts.is_some() && json.starts.is_some(), "the filter is in use");
        let forms: Vec<Vec<u8>> = variants(SECRET).into_iter().chain(variants(other.expose_secret())).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(20);
        let full = |patterns: &Patterns, haystack: &[u8]| -> Vec<(usize, usize, usize)> {
            let matches = patterns.automaton.try_find_iter(Input::new(haystack)).unwrap();
            matches.map(|m| (m.start(), m.end(), m.pattern().as_usize())).collect()
        };
        let filtered = |patterns: &Patterns, haystack: &[u8]| -> Vec<(usize, usize, usize)> {
            patterns.matches(haystack).map(|m| (m.start(), m.end(), m.pattern().as_usize())).collect()
        };
        let mut matched = 0;
        for round in 0..2000 {
            let mut text: Vec<u8> = (0..rng.random_range(0..120)).map(|_| rng.random_range(b' '..=b'~')).collect();
            for _ in 0..rng.random_range(0..3) {
                let mut form = forms[rng.random_range(0..forms.len())].clone();
                // A cut form may be a prefix only; flipped case must still match.
                if rng.random_bool(0.3) {
                    form.truncate(rng.random_range(1..=form.len()));
                }
                form.iter_mut().filter(|_| rng.random_bool(0.3)).for_each(|b| *b = b.to_ascii_uppercase());
                let at = rng.random_range(0..=text.len());
                text.splice(at..at, form);
            }
            let expected = full(main, &text);
            matched += expected.len();
            assert_eq!(filtered(main, &text), expected, "round {round}");
            // What a stream holds back at any cut is what the walk from every position holds back.
            for _ in 0..4 {
                let cut = rng.random_range(0..=text.len());
                assert_eq!(s.holdback(&text[..cut]), unfiltered.holdback(&text[..cut]), "round {round}, cut {cut}");
            }
            let json_expected = json.automaton.try_find(&Input::new(&text[..])).unwrap().is_some();
            assert_eq!(json.find_at(&text, 0).is_some(), json_expected, "round {round}");
        }
        assert!(matched > 1000, "the rounds embedded whole forms ({matched} matches)");
    }

    #[test]
    fn text_that_cannot_start_a_match_is_released_at_once() {
        let s = scrubber();
        let mut stream = StreamScrubber::new(s);
        assert_eq!(&stream.push(b"data: {\"x\":1}\n\n")[..], b"data: {\"x\":1}\n\n");
        // "sk-ca" could be the start of the secret: held back until the next chunk decides.
        assert_eq!(&stream.push(b"data: sk-ca")[..], b"data: ");
        assert_eq!(&stream.push(b"t\n\n")[..], b"sk-cat\n\n");
    }

    /// A secret with every character the encoders disagree about.
    const SPECIAL: &str = "pw-canary/RT+0123_abcdef~xyz&<>'\"!*();$@=,:?# end";

    /// `SPECIAL` as each encoder writes it, built here independently of `variants`.
    fn special_forms() -> Vec<(&'static str, String)> {
        let keep = |safe: &str| -> String {
            SPECIAL
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || safe.as_bytes().contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        let json = serde_json::to_string(SPECIAL).unwrap();
        let json = json[1..json.len() - 1].to_string();
        vec![
            ("python quote(safe='')", keep("-._~")),
            ("python quote()", keep("-._~/")),
            ("python quote_plus", keep("-._~").replace("%20", "+")),
            ("encodeURIComponent", keep("-_.!~*'()")),
            ("encodeURI", keep("-_.!~*'();,/?:@&=+$#")),
            ("URLSearchParams", keep("*-._").replace("%20", "+")),
            ("php urlencode", keep("-._").replace("%20", "+")),
            ("go PathEscape", keep("-_.~$&+,/:;=@")),
            ("lower-case percent", keep("-._~").to_lowercase()),
            ("%XX every byte", SPECIAL.bytes().map(|b| format!("%{b:02x}")).collect()),
            ("go json", json.replace('&', "\\u0026").replace('<', "\\u003c").replace('>', "\\u003e")),
            ("php json", json.replace('/', "\\/")),
            ("json \\u every char", SPECIAL.chars().map(|c| format!("\\u{:04X}", c as u32)).collect()),
            (
                "python html.escape",
                SPECIAL
                    .replace('&', "&amp;")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;")
                    .replace('"', "&quot;")
                    .replace('\'', "&#x27;"),
            ),
            ("html decimal entities", SPECIAL.chars().map(|c| format!("&#{};", c as u32)).collect()),
            ("html hex entities", SPECIAL.chars().map(|c| format!("&#X{:X};", c as u32)).collect()),
            ("hex lower", SPECIAL.bytes().map(|b| format!("{b:02x}")).collect()),
            ("hex upper", SPECIAL.bytes().map(|b| format!("{b:02X}")).collect()),
        ]
    }

    #[test]
    fn every_ecosystem_encoding_of_a_secret_with_reserved_characters_is_masked() {
        let value = SecretString::from(SPECIAL);
        let s = Scrubber::new([("SPECIAL", &value)]);
        for (encoder, form) in special_forms() {
            let input = format!("x={form}&y=1");
            let out = s.scrub(input.as_bytes());
            assert_eq!(out.len(), input.len(), "{encoder}");
            assert!(!String::from_utf8_lossy(&out).contains(&form), "{encoder}: {form} survived");
        }
        for (encoder, bytes) in [
            ("utf-16le", SPECIAL.encode_utf16().flat_map(u16::to_le_bytes).collect::<Vec<u8>>()),
            ("utf-16be", SPECIAL.encode_utf16().flat_map(u16::to_be_bytes).collect()),
        ] {
            // At an even and an odd offset.
            for before in [&b"\xff\xfe"[..], b"\x00"] {
                let mut input = before.to_vec();
                input.extend_from_slice(&bytes);
                let out = s.scrub(&input).into_owned();
                assert_eq!(out.len(), input.len());
                assert!(!out.windows(bytes.len()).any(|w| w == &bytes[..]), "{encoder} survived");
            }
        }
    }

    /// Whether base64 text, with line breaks and anything masked ignored, still decodes to `secret`.
    fn base64_reveals(text: &[u8], secret: &str) -> bool {
        let clean: Vec<u8> = text
            .iter()
            .filter(|b| !matches!(b, b'\r' | b'\n'))
            .map(|&b| if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' { b } else { b'A' })
            .collect();
        let whole = clean.len() / 4 * 4;
        let decoded = base64::engine::general_purpose::STANDARD.decode(&clean[..whole]).unwrap_or_default();
        decoded.windows(secret.len()).any(|w| w == secret.as_bytes())
    }

    #[test]
    fn wrapped_base64_is_masked_at_every_offset_and_line_position() {
        let s = scrubber();
        let b64 = base64::engine::general_purpose::STANDARD;
        for (width, eol) in [(76, "\r\n"), (76, "\n"), (64, "\n")] {
            // Every alignment (offset mod 3) and every place of the secret on a line.
            for lead in 0..=width {
                let mut plain = vec![b'.'; lead];
                plain.extend_from_slice(SECRET.as_bytes());
                plain.extend_from_slice(b" trailing bytes");
                let encoded = b64.encode(&plain);
                let lines: Vec<&str> =
                    encoded.as_bytes().chunks(width).map(|l| std::str::from_utf8(l).unwrap()).collect();
                let text = lines.join(eol) + eol;
                assert!(base64_reveals(text.as_bytes(), SECRET), "the check itself must see the secret");
                let out = s.scrub(text.as_bytes());
                assert_eq!(out.len(), text.len());
                assert!(!base64_reveals(&out, SECRET), "width {width} lead {lead}: {}", String::from_utf8_lossy(&out));
                // Line structure is kept.
                assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), lines.len());
            }
        }
    }

    #[test]
    fn headers_named_after_a_credential_are_dropped() {
        // Header names are lower-cased on the wire, so a lower-case credential fits in one whole.
        const LOWER: &str = "sk-canary-lowercase-0123456789";
        let value = SecretString::from(LOWER);
        let s = Scrubber::new([("LOWER", &value)]);
        let leaking = [
            format!("x-{LOWER}"),
            LOWER.to_string(),
            format!("x-{}", LOWER.bytes().map(|b| format!("{b:02x}")).collect::<String>()),
            format!("x-{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(LOWER).to_lowercase()),
        ];
        let mut headers = HeaderMap::new();
        headers.append("x-before", HeaderValue::from_static("1"));
        for name in &leaking {
            headers.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("1"));
            headers.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("2"));
        }
        headers.append("x-after", HeaderValue::from_static("a"));
        headers.append("x-after", HeaderValue::from_static("b"));
        s.scrub_headers(&mut headers);
        let names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-before", "x-after"]);
        assert_eq!(headers.get_all("x-after").iter().count(), 2);
    }

    #[test]
    fn headers_are_scrubbed_and_short_values_are_skipped() {
        let s = scrubber();
        let mut headers = HeaderMap::new();
        headers.insert("location", HeaderValue::from_str(&format!("https://x/?key={SECRET}")).unwrap());
        headers.insert("set-cookie", HeaderValue::from_str(&format!("s={}", encodings()[1])).unwrap());
        s.scrub_headers(&mut headers);
        assert!(!format!("{:?}", headers).contains("canary"));
        let short = SecretString::from("abc");
        assert!(Scrubber::new([("SHORT", &short)]).is_empty());
    }
}
