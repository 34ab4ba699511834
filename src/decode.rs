//! Decodes gzip and deflate response bodies, so that compression cannot hide a credential from
//! the scrubber. keyward asks upstreams for `identity`; this covers upstreams that compress anyway.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::{GzDecoder, ZlibDecoder};
use http::HeaderMap;
use http::header::CONTENT_ENCODING;
use http_body::{Body, Frame};

use crate::forward::BoxError;

/// What a response's `Content-Encoding` means for the scrubber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    /// br, zstd, compress, or a stack of codings: not inspectable, so refused.
    Unsupported,
}

pub fn coding(headers: &HeaderMap) -> Coding {
    let mut codings = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity");
    let Some(first) = codings.next() else { return Coding::Identity };
    if codings.next().is_some() {
        return Coding::Unsupported;
    }
    match first.as_str() {
        "gzip" | "x-gzip" => Coding::Gzip,
        "deflate" => Coding::Deflate,
        _ => Coding::Unsupported,
    }
}

enum Decoder {
    Gzip(GzDecoder<Vec<u8>>),
    Zlib(ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Decoder::Gzip(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decoder::Zlib(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Decoder::Gzip(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decoder::Zlib(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }
}

pub struct DecodedBody<B> {
    inner: B,
    decoder: Decoder,
    done: bool,
}

impl<B> DecodedBody<B> {
    /// `coding` must be `Gzip` or `Deflate`.
    pub fn new(inner: B, coding: Coding) -> DecodedBody<B> {
        let decoder = match coding {
            Coding::Deflate => Decoder::Zlib(ZlibDecoder::new(Vec::new())),
            _ => Decoder::Gzip(GzDecoder::new(Vec::new())),
        };
        DecodedBody { inner, decoder, done: false }
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
                    let out = this.decoder.write(&data).map_err(|e| Box::new(e) as BoxError)?;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.done = true;
                    let out = this.decoder.finish().map_err(|e| Box::new(e) as BoxError)?;
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(Bytes::from(out)))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn codings_are_classified() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_ENCODING, HeaderValue::from_str(v).unwrap());
            coding(&h)
        };
        assert_eq!(coding(&HeaderMap::new()), Coding::Identity);
        assert_eq!(of("identity"), Coding::Identity);
        assert_eq!(of("GZIP"), Coding::Gzip);
        assert_eq!(of("deflate"), Coding::Deflate);
        assert_eq!(of("br"), Coding::Unsupported);
        assert_eq!(of("gzip, gzip"), Coding::Unsupported);
    }
}
