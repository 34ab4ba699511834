//! Decodes gzip and deflate response bodies, content codings and transfer codings alike, so that
//! compression cannot hide a credential from the scrubber. keyward asks upstreams for `identity`;
//! this covers upstreams that compress anyway. Anything else is refused (502).

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::{GzDecoder, ZlibDecoder};
use http::header::{CONTENT_ENCODING, TRANSFER_ENCODING};
use http::{HeaderMap, Response};
use http_body::{Body, Frame};

/// The body error type of every body keyward forwards (`forward` re-exports it); defined here,
/// at the bottom, so that this module, which `forward` uses, does not import `forward` back.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One compression layer that keyward can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Gzip,
    /// `deflate` means the zlib format (RFC 9110 §8.4.1.2).
    Deflate,
}

/// What a response's codings mean for the scrubber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coding {
    Identity,
    /// Layers to undo, outermost first; `content` says whether the last one is the
    /// `Content-Encoding` (whose header then goes, as the agent gets the decoded body).
    Decode {
        layers: Vec<Layer>,
        content: bool,
    },
    /// br, zstd, compress, an unknown coding, a stack of content codings, or `chunked` that is
    /// not the last transfer coding: not inspectable, so refused.
    Unsupported,
}

/// The transfer codings other than the final `chunked`, in the order they were applied. hyper's
/// client removes only the chunked framing, and the `Transfer-Encoding` header goes with the
/// hop-by-hop headers, so the forwarder keeps them here (a response extension) for `coding`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferCodings(Vec<String>);

/// Records the response's transfer codings beyond `chunked` before its hop-by-hop headers go.
pub fn note_transfer_codings<B>(response: &mut Response<B>) {
    if !response.headers().contains_key(TRANSFER_ENCODING) {
        return;
    }
    let mut codings = tokens(response.headers(), TRANSFER_ENCODING);
    if codings.last().is_some_and(|last| last == "chunked") {
        codings.pop();
    }
    if !codings.is_empty() {
        response.extensions_mut().insert(TransferCodings(codings));
    }
}

/// Lower-cased coding names from every line of header `name`; an unreadable value becomes a
/// name no coding has, so it is refused.
fn tokens(headers: &HeaderMap, name: http::header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

fn layer(name: &str) -> Option<Layer> {
    match name {
        "gzip" | "x-gzip" => Some(Layer::Gzip),
        "deflate" => Some(Layer::Deflate),
        _ => None,
    }
}

/// The decoding a response needs before it can be scrubbed: its transfer codings (noted by
/// `note_transfer_codings`), last applied first, then its content coding.
pub fn coding<B>(response: &Response<B>) -> Coding {
    let mut layers = Vec::new();
    if let Some(TransferCodings(transfer)) = response.extensions().get::<TransferCodings>() {
        for name in transfer.iter().rev() {
            match name.as_str() {
                "identity" => {}
                other => match layer(other) {
                    Some(l) => layers.push(l),
                    // Includes a `chunked` before the end: hyper then reads until close and
                    // leaves the chunk framing in the body.
                    None => return Coding::Unsupported,
                },
            }
        }
    }
    let content: Vec<String> =
        tokens(response.headers(), CONTENT_ENCODING).into_iter().filter(|c| c != "identity").collect();
    let content_layer = match content.as_slice() {
        [] => None,
        [one] => match layer(one) {
            Some(l) => Some(l),
            None => return Coding::Unsupported,
        },
        _ => return Coding::Unsupported,
    };
    layers.extend(content_layer);
    if layers.len() > MAX_LAYERS {
        return Coding::Unsupported;
    }
    if layers.is_empty() { Coding::Identity } else { Coding::Decode { layers, content: content_layer.is_some() } }
}

/// More layers than any real server applies only multiply a decompression bomb.
const MAX_LAYERS: usize = 3;

/// The most one compressed frame may expand to, per layer. A few hundred bytes of stacked gzip
/// can inflate to gigabytes; a real answer's frame (at most tens of KiB) stays far below this.
pub const MAX_DECODED_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The most one answer may decode to, per layer: past it the body is cut off as an upstream
/// error, so a bomb streamed frame by frame cannot keep a worker inflating forever.
pub const MAX_DECODED_BYTES: u64 = 1024 * 1024 * 1024;

/// Where a decoder writes its output: it refuses to grow past the frame and answer limits, so
/// memory stays bounded whatever the compression ratio (flate2 writes in small pieces, so the
/// refusal comes before the allocation).
#[derive(Default)]
struct Bounded {
    out: Vec<u8>,
    total: u64,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.total += buf.len() as u64;
        if self.out.len() + buf.len() > MAX_DECODED_FRAME_BYTES || self.total > MAX_DECODED_BYTES {
            return Err(std::io::Error::other(
                "the upstream's compressed answer expands past keyward's decoding limit",
            ));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Inflate {
    Gzip(GzDecoder<Bounded>),
    Zlib(ZlibDecoder<Bounded>),
}

struct Decoder {
    inflate: Inflate,
    /// Whether any byte arrived: a HEAD, 204 or 304 answer keeps its codings but has no body,
    /// which is not a truncated stream.
    fed: bool,
}

impl Decoder {
    fn new(layer: Layer) -> Decoder {
        let inflate = match layer {
            Layer::Gzip => Inflate::Gzip(GzDecoder::new(Bounded::default())),
            Layer::Deflate => Inflate::Zlib(ZlibDecoder::new(Bounded::default())),
        };
        Decoder { inflate, fed: false }
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        self.fed |= !data.is_empty();
        match &mut self.inflate {
            Inflate::Gzip(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(&mut d.get_mut().out))
            }
            Inflate::Zlib(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(&mut d.get_mut().out))
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        if !self.fed {
            return Ok(Vec::new());
        }
        match &mut self.inflate {
            Inflate::Gzip(d) => {
                d.try_finish()?;
                Ok(std::mem::take(&mut d.get_mut().out))
            }
            Inflate::Zlib(d) => {
                d.try_finish()?;
                Ok(std::mem::take(&mut d.get_mut().out))
            }
        }
    }
}

pub struct DecodedBody<B> {
    inner: B,
    /// Outermost first: each one's output is the next one's input.
    decoders: Vec<Decoder>,
    done: bool,
}

impl<B> DecodedBody<B> {
    pub fn new(inner: B, layers: &[Layer]) -> DecodedBody<B> {
        DecodedBody { inner, decoders: layers.iter().map(|&l| Decoder::new(l)).collect(), done: false }
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut data = Vec::from(data);
        for decoder in &mut self.decoders {
            data = decoder.write(&data)?;
        }
        Ok(data)
    }

    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        let mut carry = Vec::new();
        for decoder in &mut self.decoders {
            let mut out = decoder.write(&carry)?;
            out.extend(decoder.finish()?);
            carry = out;
        }
        Ok(carry)
    }
}

impl<B> Body for DecodedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    let out = this.write(&data).map_err(|e| Box::new(e) as BoxError)?;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.done = true;
                    let out = this.finish().map_err(|e| Box::new(e) as BoxError)?;
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(Bytes::from(out)))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A HEAD, 204 or 304 answer keeps its codings but has no body, and hyper drops such a
        // body without polling it: it is complete, not cut off.
        self.done || (!self.decoders.first().is_some_and(|d| d.fed) && self.inner.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;

    fn response(content: Option<&str>, transfer: Option<&str>) -> Response<()> {
        let mut r = Response::new(());
        if let Some(v) = content {
            r.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = transfer {
            r.headers_mut().insert(TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        note_transfer_codings(&mut r);
        r
    }

    #[test]
    fn codings_are_classified() {
        let of = |content, transfer| coding(&response(content, transfer));
        let decode = |layers: &[Layer], content| Coding::Decode { layers: layers.to_vec(), content };
        assert_eq!(of(None, None), Coding::Identity);
        assert_eq!(of(Some("identity"), None), Coding::Identity);
        assert_eq!(of(Some("GZIP"), None), decode(&[Layer::Gzip], true));
        assert_eq!(of(Some("deflate"), None), decode(&[Layer::Deflate], true));
        assert_eq!(of(Some("br"), None), Coding::Unsupported);
        assert_eq!(of(Some("gzip, gzip"), None), Coding::Unsupported);
        assert_eq!(of(None, Some("chunked")), Coding::Identity);
        assert_eq!(of(None, Some("gzip, chunked")), decode(&[Layer::Gzip], false));
        assert_eq!(of(None, Some("Deflate,chunked")), decode(&[Layer::Deflate], false));
        // Close-delimited: no chunked at all.
        assert_eq!(of(None, Some("gzip")), decode(&[Layer::Gzip], false));
        // Applied in order, so undone last first, then the content coding.
        assert_eq!(
            of(Some("gzip"), Some("deflate, gzip, chunked")),
            decode(&[Layer::Gzip, Layer::Deflate, Layer::Gzip], true)
        );
        assert_eq!(of(None, Some("gzip, gzip, gzip, gzip, chunked")), Coding::Unsupported);
        for refused in ["compress, chunked", "br", "zstd, chunked", "chunked, gzip", "gzip;q=1, chunked", "x-custom"] {
            assert_eq!(of(None, Some(refused)), Coding::Unsupported, "{refused}");
        }
    }

    #[tokio::test]
    async fn an_empty_body_decodes_to_nothing() {
        // A HEAD, 204 or 304 answer keeps its codings but has no body.
        for layers in [&[Layer::Gzip][..], &[Layer::Deflate], &[Layer::Gzip, Layer::Deflate]] {
            let body = http_body_util::Empty::<Bytes>::new().map_err(|never| -> BoxError { match never {} });
            let decoded = DecodedBody::new(body, layers).collect().await.unwrap().to_bytes();
            assert!(decoded.is_empty());
        }
    }

    #[tokio::test]
    async fn a_decompression_bomb_is_cut_off_before_it_is_allocated() {
        // 20 MiB of zeros gzips to about 20 KiB, delivered in one frame: past the frame limit.
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&vec![0u8; MAX_DECODED_FRAME_BYTES + 4 * 1024 * 1024]).unwrap();
        let wire = gzip.finish().unwrap();
        assert!(wire.len() < 64 * 1024);
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(Bytes::from(wire)))];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let error = DecodedBody::new(body, &[Layer::Gzip]).collect().await.map(|_| ()).expect_err("refused");
        assert!(error.to_string().contains("decoding limit"), "{error}");
    }

    #[test]
    fn an_answer_without_a_body_is_complete_before_it_is_polled() {
        let body = DecodedBody::new(http_body_util::Empty::<Bytes>::new().map_err(|e| match e {}), &[Layer::Gzip]);
        assert!(body.is_end_stream(), "hyper drops a HEAD/204/304 body unpolled: it must not look cut off");
    }

    #[tokio::test]
    async fn stacked_layers_are_undone_in_order() {
        let plain = b"sk-canary-hidden-under-two-layers ".repeat(100);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(&plain).unwrap();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&zlib.finish().unwrap()).unwrap();
        let wire = gzip.finish().unwrap();
        // Delivered in small pieces, as a network would.
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            wire.chunks(7).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let decoded = DecodedBody::new(body, &[Layer::Gzip, Layer::Deflate]).collect().await.unwrap().to_bytes();
        assert_eq!(&decoded[..], &plain[..]);
    }
}
