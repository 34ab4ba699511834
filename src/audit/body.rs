//! A response body that carries the request's audit guard and ends it when the body ends:
//! complete, broken off by the upstream, or dropped because the agent went away.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::guard::{AuditGuard, BodyEnd};

pub struct AuditedBody<B: Body> {
    inner: B,
    audit: Option<AuditGuard>,
    bytes: u64,
}

impl<B: Body> AuditedBody<B> {
    pub fn new(inner: B, audit: AuditGuard) -> AuditedBody<B> {
        AuditedBody { inner, audit: Some(audit), bytes: 0 }
    }
}

impl<B> Body for AuditedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                if this.inner.is_end_stream() {
                    this.end(BodyEnd::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(BodyEnd::UpstreamBroke),
            Poll::Ready(None) => this.end(BodyEnd::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> AuditedBody<B> {
    fn end(&mut self, end: BodyEnd) {
        if let Some(audit) = self.audit.take() {
            audit.finish(end, self.bytes);
        }
    }
}

impl<B: Body> Drop for AuditedBody<B> {
    fn drop(&mut self) {
        // hyper drops a body it knows is complete (HEAD, 204, or after the last frame) without
        // polling it again; that is a completed response. Otherwise the agent went away, and the
        // guard's own drop records the disconnect.
        if let Some(audit) = self.audit.take()
            && self.inner.is_end_stream()
        {
            audit.finish(BodyEnd::Complete, self.bytes);
        }
    }
}
