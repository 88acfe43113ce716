//! What one client connection reports about itself: requests received and in flight, and
//! whether its answers are being read. The service and bodies here count; the watchdog
//! ([`super::watchdog`]) judges. The counters are the connection's own, so they cost a few
//! uncontended atomic operations per request and no lock.

use super::deadline::KeptTimers;
use super::goaway::SocketSignals;
use super::watchdog::Snapshot;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

/// How a connection and what it outlives (an upgraded tunnel) learn of shutdown and take
/// part in the drain: the server waits until every holder of `_running` is gone.
#[derive(Debug)]
pub struct Draining {
    pub shutdown: crate::shutdown::Shutdown,
    pub grace: Duration,
    pub _running: tokio::sync::watch::Receiver<()>,
}

/// How many forwarded requests a connection may cancel, and over what window.
#[derive(Clone, Copy, Debug)]
pub struct CancelBudget {
    pub max: u32,
    pub window: Duration,
}

/// One client connection: its peer, its counters, and its place under `max_connections`,
/// which is given back when the last holder (the connection or an upgraded tunnel) lets go.
#[derive(Debug)]
pub struct ClientConn {
    peer: SocketAddr,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    pulls: AtomicU64,
    awaiting_reader: AtomicUsize,
    cancel_budget: CancelBudget,
    /// The current window's start and the forwarded requests cancelled in it.
    cancelled: Mutex<(Instant, u32)>,
    /// Over the cancel budget: no more requests are forwarded, the connection is ending.
    calmed: AtomicBool,
    calm: Notify,
    /// Shared with the connection's socket: its GOAWAY switch and its count of reads.
    pub signals: Arc<SocketSignals>,
    /// The socket's reads when the connection last went idle (nothing in flight).
    idle_reads: AtomicU64,
    /// Shutdown, and the server's count of what is still running.
    pub draining: Draining,
    /// The certificate the client presented over TLS, if any.
    client_cert: Option<crate::tls::ClientCert>,
    /// Its accept loop's timers, which bound each request's wait for its upstream's answer.
    pub timers: Arc<KeptTimers>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl ClientConn {
    /// Creates the record of a connection from `peer` holding `slot`.
    pub fn new(
        peer: SocketAddr,
        slot: Option<OwnedSemaphorePermit>,
        cancel_budget: CancelBudget,
        draining: Draining,
        client_cert: Option<crate::tls::ClientCert>,
        timers: Arc<KeptTimers>,
    ) -> ClientConn {
        ClientConn {
            peer,
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            pulls: AtomicU64::new(0),
            awaiting_reader: AtomicUsize::new(0),
            cancel_budget,
            cancelled: Mutex::new((Instant::now(), 0)),
            calmed: AtomicBool::new(false),
            calm: Notify::new(),
            signals: Arc::default(),
            idle_reads: AtomicU64::new(0),
            draining,
            client_cert,
            timers,
            _slot: slot,
        }
    }

    /// Notes that the client gave up on a request already forwarded upstream; past the
    /// cancel budget, the connection is to calm down (see [`ClientConn::calm_requested`]).
    pub fn note_cancelled(&self) {
        let now = Instant::now();
        let count = {
            let mut window = self.cancelled.lock().unwrap_or_else(|e| e.into_inner());
            if now >= window.0 + self.cancel_budget.window {
                *window = (now, 0);
            }
            window.1 += 1;
            window.1
        };
        if count > self.cancel_budget.max && !self.calmed.swap(true, Relaxed) {
            self.calm.notify_one();
        }
    }

    /// Tells whether the client cancelled too many forwarded requests: its new requests are
    /// refused without being forwarded.
    pub fn is_calmed(&self) -> bool {
        self.calmed.load(Relaxed)
    }

    /// Resolves once the client has cancelled more than its budget.
    pub async fn calm_requested(&self) {
        self.calm.notified().await;
    }

    /// Returns the budget the client went over.
    pub fn cancel_budget(&self) -> CancelBudget {
        self.cancel_budget
    }

    /// Returns the client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Returns the certificate the client presented over TLS, if any.
    pub fn client_cert(&self) -> Option<&crate::tls::ClientCert> {
        self.client_cert.as_ref()
    }

    /// Reads the counters for the watchdog.
    pub fn snapshot(&self) -> Snapshot {
        let reads = self.signals.http1_reads();
        Snapshot {
            reads_since_idle: reads.saturating_sub(self.idle_reads.load(Relaxed)),
            http1: reads > 0,
            requests: self.requests.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            pulls: self.pulls.load(Relaxed),
            awaiting_reader: self.awaiting_reader.load(Relaxed),
        }
    }
}

/// A request in flight on a connection, until its answer is handed over or dropped.
struct InFlight {
    conn: Arc<ClientConn>,
    /// The answer handed out a piece the client side has not yet come back for.
    handed: bool,
}

impl InFlight {
    fn start(conn: &Arc<ClientConn>) -> InFlight {
        conn.requests.fetch_add(1, Relaxed);
        conn.in_flight.fetch_add(1, Relaxed);
        InFlight {
            conn: conn.clone(),
            handed: false,
        }
    }

    fn pulled(&mut self) {
        self.conn.pulls.fetch_add(1, Relaxed);
        if std::mem::take(&mut self.handed) {
            self.conn.awaiting_reader.fetch_sub(1, Relaxed);
        }
    }

    fn handed(&mut self) {
        self.handed = true;
        self.conn.awaiting_reader.fetch_add(1, Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.handed {
            self.conn.awaiting_reader.fetch_sub(1, Relaxed);
        }
        if self.conn.in_flight.fetch_sub(1, Relaxed) == 1 {
            // Idle from here: what the socket reads next is the next request head.
            let reads = self.conn.signals.http1_reads();
            self.conn.idle_reads.store(reads, Relaxed);
        }
    }
}

/// A service whose requests and answers are counted on their connection.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    conn: Arc<ClientConn>,
}

impl<S> Counted<S> {
    /// Counts the requests `inner` serves on `conn`.
    pub fn new(inner: S, conn: Arc<ClientConn>) -> Counted<S> {
        Counted { inner, conn }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        CountedFuture {
            inner: self.inner.call(request),
            in_flight: Some(InFlight::start(&self.conn)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a [`Counted`] service, still being made.
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let in_flight = this.in_flight.take().expect("polled after completion");
        Poll::Ready(result.map(|response| {
            response.map(|inner| CountedBody {
                inner,
                _in_flight: in_flight,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// An answer whose reading is counted on its connection.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        _in_flight: InFlight,
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        this._in_flight.pulled();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this._in_flight.handed();
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
