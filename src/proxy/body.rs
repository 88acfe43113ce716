//! The bodies the proxy passes on. A request's goes upstream held in memory (none, a kept
//! body) or streamed with a bound on the gaps between the client's bytes; an answer's comes
//! back streamed as received, or held in memory (an inspected answer, the proxy's own).

use super::record::Record;
use super::upstream::UpstreamBody;
use crate::server::goaway::SocketSignals;
use crate::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The body of a request on its way upstream.
///
/// 32 bytes: a request with it is 256, which each of the request's moves through the
/// proxy's futures and hyper's client copies in one short run. Past 256 bytes `memcpy` takes
/// its long path, about twice the instructions, at each of a dozen moves per request.
#[derive(Debug)]
pub enum RequestBody {
    /// Held in memory, sent whole: a kept body, or none (empty). `Bytes` itself rather than
    /// `http_body_util::Full`, whose `Option` takes the one spare value that lets `Timed`
    /// share these 32 bytes without a tag of its own.
    Full(Bytes),
    /// The client's, streamed, failing when the client is too slow. Boxed: most requests
    /// have no body.
    Timed(Box<TimedBody>),
}

impl RequestBody {
    /// No body.
    pub const EMPTY: RequestBody = RequestBody::Full(Bytes::new());
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Full(bytes) if bytes.is_empty() => Poll::Ready(None),
            RequestBody::Full(bytes) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(bytes))))),
            RequestBody::Timed(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full(bytes) => bytes.is_empty(),
            RequestBody::Timed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Full(bytes) => SizeHint::with_exact(bytes.len() as u64),
            RequestBody::Timed(body) => body.size_hint(),
        }
    }
}

/// The body of every answer the proxy gives.
#[derive(Debug)]
pub enum ProxyBody {
    /// An upstream's answer, streamed as received.
    Upstream(UpstreamBody),
    /// Held in memory: an inspected answer, or the proxy's own.
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
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Full(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(body) => body.is_end_stream(),
            ProxyBody::Full(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(body) => body.size_hint(),
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

/// The client was too slow with its request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyTimeout {
    /// It paused for longer than `server.body_timeout`.
    #[error("the client sent no request body bytes for {} (server.body_timeout)", humantime::format_duration(*.0))]
    Gap(Duration),
    /// Beyond `server.body_timeout` of waiting, it sent fewer bytes per second of it than
    /// `server.min_body_rate`.
    #[error("the client sent its request body slower than {0} bytes/s (server.min_body_rate)")]
    Slow(u64),
}

/// The bounds on how slowly a client may send a request body.
#[derive(Clone, Copy, Debug)]
pub struct BodyPace {
    /// The longest pause (`server.body_timeout`), and the waiting allowed before the rate
    /// counts.
    pub gap: Duration,
    /// Bytes per second of waiting, at least (`server.min_body_rate`); 0: any.
    pub min_rate: u64,
}

/// A request body that fails with [`BodyTimeout`] when no bytes come for `pace.gap` while it
/// is being read, or, once it has been waited on for longer than that, fewer than
/// `pace.min_rate` bytes came per second of waiting: a body trickled a byte at a time holds
/// its connections no longer than one that stops. Time spent while the reader is not asking
/// (the upstream is slow to take the body) does not count against the client.
#[derive(Debug)]
pub struct TimedBody {
    inner: Incoming,
    pace: BodyPace,
    /// Made at the first wait, so a body that never waits costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the wait under way began, and what ends it if no bytes come first.
    waiting: Option<(Instant, BodyTimeout)>,
    /// Time waited for the client before the wait under way.
    waited: Duration,
    /// Data bytes received.
    received: u64,
    timed_out: bool,
    /// Told when the body is first waited for ([`SocketSignals::body_late`]).
    socket: Option<Arc<SocketSignals>>,
}

impl TimedBody {
    /// Bounds how slowly `inner` may come by `pace`; the first wait for it is told to
    /// `socket`, its client connection's.
    pub fn new(inner: Incoming, pace: BodyPace, socket: Option<Arc<SocketSignals>>) -> TimedBody {
        TimedBody {
            inner,
            pace,
            timer: None,
            waiting: None,
            waited: Duration::ZERO,
            received: 0,
            timed_out: false,
            socket,
        }
    }

    /// Starts a wait at `now`: returns when it ends the body, and why.
    fn deadline(&self, now: Instant) -> (Instant, BodyTimeout) {
        let gap = (now + self.pace.gap, BodyTimeout::Gap(self.pace.gap));
        if self.pace.min_rate == 0 {
            return gap;
        }
        // The waiting the bytes received so far pay for, and at least the grace of one gap.
        let earned = Duration::from_millis(self.received.saturating_mul(1000) / self.pace.min_rate);
        let allowed = earned.max(self.pace.gap).saturating_sub(self.waited);
        if allowed < self.pace.gap {
            (now + allowed, BodyTimeout::Slow(self.pace.min_rate))
        } else {
            gap
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
                if let Some((since, _)) = this.waiting.take() {
                    this.waited += since.elapsed();
                }
                if let Some(Ok(frame)) = &frame {
                    this.received += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if let Some(socket) = this.socket.take() {
                    socket.body_late();
                }
                if this.waiting.is_none() {
                    let now = Instant::now();
                    let (deadline, reason) = this.deadline(now);
                    this.waiting = Some((now, reason));
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let timer = this.timer.as_mut().expect("set when the wait began");
                if timer.as_mut().poll(cx).is_ready() {
                    this.timed_out = true;
                    let reason = this.waiting.map(|(_, reason)| reason);
                    let reason = reason.expect("set when the wait began");
                    return Poll::Ready(Some(Err(Box::new(reason))));
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
pub fn body_timeout_in(error: &(dyn std::error::Error + 'static)) -> Option<BodyTimeout> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
            return Some(*timeout);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use tokio::io::AsyncWriteExt;

    /// Serves one request on an in-memory connection whose client writes `head`, then,
    /// once told, `rest`; returns whether the first poll of its body found it there and
    /// whether the socket was told the body was waited for.
    async fn first_poll(head: &'static [u8], rest: &'static [u8]) -> (bool, bool) {
        let (mut client, server) = tokio::io::duplex(4096);
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let seen_tx = seen_tx.lock().unwrap().take();
            async move {
                let signals = Arc::new(SocketSignals::default());
                let pace = BodyPace {
                    gap: Duration::from_secs(5),
                    min_rate: 0,
                };
                let mut body = TimedBody::new(request.into_body(), pace, Some(signals.clone()));
                let polled = std::future::poll_fn(|cx| {
                    Poll::Ready(Pin::new(&mut body).poll_frame(cx).is_ready())
                })
                .await;
                if let Some(seen) = seen_tx {
                    let _ = seen.send((polled, signals.acknowledges_next_read()));
                }
                http_body_util::BodyExt::collect(body).await.unwrap();
                Ok::<_, BoxError>(Response::new(http_body_util::Empty::<Bytes>::new()))
            }
        });
        let serving = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        client.write_all(head).await.unwrap();
        let seen = seen_rx.await.unwrap();
        client.write_all(rest).await.unwrap();
        drop(client);
        let _ = serving.await;
        seen
    }

    #[test]
    fn a_request_on_its_way_upstream_fits_memcpys_short_path() {
        assert!(std::mem::size_of::<Request<RequestBody>>() <= 256);
    }

    #[tokio::test]
    async fn a_kept_body_is_sent_whole_once_and_an_empty_one_not_at_all() {
        use http_body_util::BodyExt;
        let mut kept = RequestBody::Full(Bytes::from_static(b"{\"query\":1}"));
        assert_eq!(kept.size_hint().exact(), Some(11));
        assert!(!kept.is_end_stream());
        let data = kept.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, Bytes::from_static(b"{\"query\":1}"));
        assert!(kept.is_end_stream());
        assert!(kept.frame().await.is_none());

        let mut empty = RequestBody::EMPTY;
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_first_waited_for_is_told_to_its_socket() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(first_poll(head, b"xy").await, (false, true));
    }

    #[tokio::test]
    async fn a_body_that_came_with_its_head_is_not_told() {
        let whole = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nxy";
        assert_eq!(first_poll(whole, b"").await, (true, false));
    }
}
