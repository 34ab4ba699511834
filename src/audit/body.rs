//! A response body that carries the request's audit guard and ends it when the body ends:
//! complete, broken off by the upstream, cut off by keyward, or dropped because the agent went
//! away (before or after it had the response head).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::guard::{AuditGuard, BodyEnd};
use crate::forward::BoxError;

pub struct AuditedBody<B: Body> {
    inner: B,
    audit: Option<AuditGuard>,
    bytes: u64,
    /// The server polls a body only once it has the response head to write: from then on the
    /// agent has its status, and leaving is no longer a failed call.
    head_delivered: bool,
}

impl<B: Body> AuditedBody<B> {
    pub fn new(inner: B, audit: AuditGuard) -> AuditedBody<B> {
        AuditedBody { inner, audit: Some(audit), bytes: 0, head_delivered: false }
    }
}

impl<B> Body for AuditedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.head_delivered = true;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                if this.inner.is_end_stream() {
                    this.end(BodyEnd::Complete);
                }
            }
            Poll::Ready(Some(Err(error))) => this.end(who_broke_off(error.as_ref())),
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

/// A body error from the upstream's connection (reset, closed early, bad framing) is the
/// upstream's ending; any other error is keyward's own cut: a read timeout or deadline, or a
/// body keyward could not decode.
fn who_broke_off(error: &(dyn std::error::Error + 'static)) -> BodyEnd {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<hyper::Error>() {
            return BodyEnd::UpstreamBroke;
        }
        source = error.source();
    }
    BodyEnd::KeywardCut
}

impl<B: Body> Drop for AuditedBody<B> {
    fn drop(&mut self) {
        let Some(audit) = self.audit.take() else { return };
        if self.inner.is_end_stream() {
            // hyper drops a body it knows is complete (HEAD, 204, or after the last frame)
            // without polling it again; that is a completed response.
            audit.finish(BodyEnd::Complete, self.bytes);
        } else if self.head_delivered {
            // The agent had its answer's head and closed the stream: normal for SSE and MCP.
            audit.finish(BodyEnd::AgentLeft, self.bytes);
        }
        // Otherwise the agent went away before the head; the guard's own drop records that.
    }
}
