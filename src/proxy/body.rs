//! The bodies the proxy passes on: streamed as received, streamed with a bound on the gaps
//! between the client's bytes, or a small body held in memory.

use super::record::Record;
use super::upstream::UpstreamBody;
use crate::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The body of every request and response the proxy passes on.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed as received from the client.
    Streamed(Incoming),
    /// An upstream's answer, streamed as received.
    Upstream(UpstreamBody),
    /// A client's body, streamed, that fails when the client pauses too long.
    Timed(TimedBody),
    /// Held in memory: a kept request body, an inspected answer, or the proxy's own.
    Full(Full<Bytes>),
}

impl ProxyBody {
    /// Wraps bytes held in memory.
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Full::new(bytes.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Streamed(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Timed(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Full(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Streamed(body) => body.is_end_stream(),
            ProxyBody::Upstream(body) => body.is_end_stream(),
            ProxyBody::Timed(body) => body.inner.is_end_stream(),
            ProxyBody::Full(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Streamed(body) => body.size_hint(),
            ProxyBody::Upstream(body) => body.size_hint(),
            ProxyBody::Timed(body) => body.inner.size_hint(),
            ProxyBody::Full(body) => body.size_hint(),
        }
    }
}

/// An answer's body with the record of its request, which ends when the body is dropped:
/// sent to its end, or given up with its connection.
#[derive(Debug)]
pub struct Metered {
    body: ProxyBody,
    _record: Record,
}

impl Metered {
    /// Joins an answer's body and its request's record.
    pub fn new(body: ProxyBody, record: Record) -> Metered {
        Metered {
            body,
            _record: record,
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client paused its request body for longer than `server.body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body bytes for {} (server.body_timeout)", humantime::format_duration(*.0))]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] when no bytes come for `gap` while it is
/// being read. Time spent while the reader is not asking (the upstream is slow to take the
/// body) does not count against the client.
#[derive(Debug)]
pub struct TimedBody {
    inner: Incoming,
    gap: Duration,
    /// Made at the first wait, so a body that never waits costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame came since the timer was last set: the next wait starts a new gap.
    restart: bool,
    timed_out: bool,
}

impl TimedBody {
    /// Bounds the gaps of `inner` to `gap`.
    pub fn new(inner: Incoming, gap: Duration) -> TimedBody {
        TimedBody {
            inner,
            gap,
            timer: None,
            restart: true,
            timed_out: false,
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.restart = true;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.gap;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if std::mem::take(&mut this.restart) {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.timed_out = true;
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(this.gap)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds a [`BodyTimeout`] among the causes of `error`.
pub fn body_timeout_in(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
            return Some(timeout.0);
        }
        cause = e.source();
    }
    None
}
