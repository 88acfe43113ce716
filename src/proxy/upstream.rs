//! What the proxy may ask of each upstream, and what a request that its client abandons
//! leaves behind.
//!
//! Each upstream (scheme and authority) has a budget of `max_connections`: that many
//! requests in flight at once (a request waits for a place, bounded, then gets 503) and that
//! many connections open (the connector waits for a place, so the bound holds even when a
//! pooled connection comes back late). A request whose client goes away is not torn down
//! with its upstream connection when that is cheap to avoid: the answer is awaited and a
//! small rest read and discarded in the background, so the connection returns to the pool.

use super::pool::{Pooled, SendError, Sending};
use crate::server::conn::ClientConn;
use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most of an abandoned answer read to keep its connection.
pub const DRAIN_LIMIT_BYTES: usize = 64 * 1024;
/// The longest an abandoned answer is waited for and read to keep its connection.
pub const DRAIN_TIME: Duration = Duration::from_secs(1);

/// One upstream's budget: requests in flight and connections open, each at most `max`.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    requests: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

impl Budget {
    fn new(max: usize) -> Budget {
        Budget {
            max,
            requests: Arc::new(Semaphore::new(max)),
            connections: Arc::new(Semaphore::new(max)),
        }
    }

    /// Returns the budget's size.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Counts the places for requests free now.
    pub fn free_requests(&self) -> usize {
        self.requests.available_permits()
    }

    /// Takes a place for a new connection, if one is free now.
    pub fn connection_place(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Waits for a place for a new connection.
    pub async fn wait_connection_place(&self) -> OwnedSemaphorePermit {
        self.connections
            .clone()
            .acquire_owned()
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Takes a place for one request, waiting up to `wait` for one to free up.
    pub async fn request_slot(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.requests.clone().try_acquire_owned() {
            return Some(slot);
        }
        tokio::time::timeout(wait, self.requests.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

/// The budgets of every upstream, by `scheme://authority`.
#[derive(Debug, Default)]
pub struct Budgets(HashMap<String, Arc<Budget>>);

impl Budgets {
    /// Makes one budget per `scheme://authority`, of the smallest size any route gives it.
    pub fn new(sizes: impl IntoIterator<Item = (String, usize)>) -> Budgets {
        Budgets::keeping(sizes, None)
    }

    /// Makes the budgets as [`Budgets::new`] does, keeping each budget of `previous` whose
    /// size did not change: what the requests and connections of the configuration before
    /// still hold counts against it, so a reload never lets an upstream see more.
    pub fn keeping(
        sizes: impl IntoIterator<Item = (String, usize)>,
        previous: Option<&Budgets>,
    ) -> Budgets {
        let mut smallest: HashMap<String, usize> = HashMap::new();
        for (origin, max) in sizes {
            let size = smallest.entry(origin).or_insert(max);
            *size = (*size).min(max);
        }
        Budgets(
            smallest
                .into_iter()
                .map(|(origin, max)| {
                    let kept = previous
                        .and_then(|p| p.0.get(&origin))
                        .filter(|budget| budget.max == max);
                    let budget = kept.cloned().unwrap_or_else(|| Arc::new(Budget::new(max)));
                    (origin, budget)
                })
                .collect(),
        )
    }

    /// Returns the budget of `scheme://authority`.
    pub fn get(&self, origin: &str) -> Option<Arc<Budget>> {
        self.0.get(origin).cloned()
    }
}

/// An upstream connection holding its place in the budget until it closes.
pub struct Budgeted<T> {
    io: T,
    _place: OwnedSemaphorePermit,
}

impl<T> Budgeted<T> {
    /// Lets `io` hold `place` while it is open.
    pub fn new(io: T, place: OwnedSemaphorePermit) -> Budgeted<T> {
        Budgeted { io, _place: place }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Budgeted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Budgeted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One request's exchange with its upstream, from sending to the answer's head. Dropped
/// before the head arrives (its client went away), it is finished in the background.
pub struct Exchange {
    future: Option<Sending>,
    slot: Option<OwnedSemaphorePermit>,
    client: Arc<ClientConn>,
}

impl Exchange {
    /// Watches `future`, which holds the request's place `slot`, for `client`.
    pub fn new(future: Sending, slot: OwnedSemaphorePermit, client: Arc<ClientConn>) -> Exchange {
        Exchange {
            future: Some(future),
            slot: Some(slot),
            client,
        }
    }

    /// Gives up on the answer (the proxy's own timeout): nothing is finished in the background.
    pub fn give_up(mut self) {
        self.future = None;
    }
}

impl Future for Exchange {
    type Output = Result<Response<UpstreamBody>, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let future = this.future.as_mut().expect("polled after completion");
        let result = std::task::ready!(future.as_mut().poll(cx));
        this.future = None;
        let slot = this.slot.take();
        let client = this.client.clone();
        Poll::Ready(result.map(|(response, conn)| {
            // A connection handed over to a tunnel is never reused.
            let conn = conn.filter(|_| response.status() != http::StatusCode::SWITCHING_PROTOCOLS);
            response.map(|body| UpstreamBody::new(body, slot, client, conn))
        }))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            self.client.note_cancelled();
            finish_in_background(future, self.slot.take());
        }
    }
}

/// Awaits an abandoned exchange's answer and drains it in the background. Cold and apart:
/// the task it spawns would otherwise be built in the stack frame of every request's poll.
#[cold]
#[inline(never)]
fn finish_in_background(future: Sending, slot: Option<OwnedSemaphorePermit>) {
    in_background(async move {
        let deadline = tokio::time::Instant::now() + DRAIN_TIME;
        if let Ok(Ok((response, conn))) = tokio::time::timeout_at(deadline, future).await {
            drain(response.into_body(), slot, conn, deadline).await;
        }
    });
}

/// An upstream's answer, holding its request's place and its connection. Read to its end,
/// it gives the connection back; dropped before (its client went away), a small rest is read
/// and discarded in the background to keep the connection.
#[derive(Debug)]
pub struct UpstreamBody {
    body: Option<Incoming>,
    slot: Option<OwnedSemaphorePermit>,
    /// Told when the answer is abandoned; `None` once the body has ended.
    client: Option<Arc<ClientConn>>,
    /// The HTTP/1.1 connection the answer comes on.
    conn: Option<Pooled>,
}

impl UpstreamBody {
    fn new(
        body: Incoming,
        slot: Option<OwnedSemaphorePermit>,
        client: Arc<ClientConn>,
        conn: Option<Pooled>,
    ) -> UpstreamBody {
        UpstreamBody {
            body: Some(body),
            slot,
            client: Some(client),
            conn,
        }
    }

    /// Lets the proxy itself drop the answer unread (a refused token's answer, replaced by
    /// a replay): the rest is drained as usual, but it does not count against the client.
    pub fn discard(mut self) {
        self.client = None;
    }

    /// The body has ended: nothing to keep, the place is free, the connection may serve
    /// another request.
    fn ended(&mut self) {
        self.body = None;
        self.slot = None;
        self.client = None;
        if let Some(conn) = self.conn.take() {
            conn.give_back();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.ended(),
            Poll::Ready(Some(Err(_))) => {
                // Broken: the connection is not reused.
                this.conn = None;
                this.ended();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or(SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if body.is_end_stream() {
            self.ended();
            return;
        }
        if let Some(client) = &self.client {
            client.note_cancelled();
        }
        let small = body
            .size_hint()
            .upper()
            .is_none_or(|n| n <= DRAIN_LIMIT_BYTES as u64);
        if small {
            drain_in_background(body, self.slot.take(), self.conn.take());
        }
    }
}

/// Drains an abandoned answer's small rest in the background, to keep its connection.
/// Cold and apart, as [`finish_in_background`] is.
#[cold]
#[inline(never)]
fn drain_in_background(body: Incoming, slot: Option<OwnedSemaphorePermit>, conn: Option<Pooled>) {
    in_background(drain(
        body,
        slot,
        conn,
        tokio::time::Instant::now() + DRAIN_TIME,
    ));
}

/// Runs `work` on the runtime, if there still is one (a drop at runtime shutdown has none).
fn in_background(work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work);
    }
}

/// Reads `body` to its end if that takes at most [`DRAIN_LIMIT_BYTES`] and ends by
/// `deadline`, then gives its connection `conn` back to the pool; otherwise drops both,
/// which closes the connection. The request's place, `slot`, is held until then.
async fn drain(
    mut body: Incoming,
    slot: Option<OwnedSemaphorePermit>,
    conn: Option<Pooled>,
    deadline: tokio::time::Instant,
) {
    use http_body_util::BodyExt;
    let mut read = 0;
    let reading = async {
        loop {
            match body.frame().await {
                None => return true,
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_LIMIT_BYTES {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    };
    let ended = tokio::time::timeout_at(deadline, reading)
        .await
        .unwrap_or(false);
    if let (true, Some(conn)) = (ended, conn) {
        conn.give_back();
    }
    drop(slot);
}
