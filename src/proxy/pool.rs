//! The connections to one upstream, kept for reuse.
//!
//! A pool belongs to one upstream (scheme and authority; its TLS settings; h2c or not) and is
//! made when a configuration is loaded, so a request reaches its pool through its route
//! without a lookup. HTTP/1.1 connections wait in a stack (the most recently used first, so
//! the fewest stay warm) while no request uses them, one stack per worker: a connection is
//! driven by a task on the worker that opened it, and a request on another worker would
//! wake that thread and be woken by it, two system calls each way. A request takes one of
//! its worker's connections, or opens one when the upstream's budget has a place, or takes
//! another worker's, or waits for whichever comes first: a place or a connection given
//! back. A connection is given back when its answer's body has ended, and
//! ready again once hyper has read that end; one dropped mid-answer closes. An HTTP/2
//! connection (agreed by ALPN, or h2c) is one per worker, shared by its requests.
//!
//! An idle connection is reused only while the upstream surely still keeps it: for
//! `server.upstream_idle_timeout`, or a second less than the upstream said it keeps idle
//! connections (`Keep-Alive: timeout=5`, which Node services send), if that is shorter. A
//! request written on a connection the upstream was closing just then may have reached it.
//!
//! A reload keeps a pool whose settings did not change, and hands it a connector made from
//! the certificate files as they are then; if their contents changed, the connections made
//! with the old ones are not reused.
//!
//! A request that a reused connection closed under before it was written is sent again on
//! another connection. One that was written is not sent again here: the pool tells the
//! caller, which may send an idempotent request once more ([`SendError::Dropped`]).

use super::body::RequestBody;
use super::upstream::Budget;
use crate::BoxError;
use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use http::{header, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tower_service::Service;

/// How much sooner than an upstream's `Keep-Alive: timeout` its idle connections stop being
/// reused: the time for a request to reach the upstream before the upstream closes.
pub const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);
/// How often idle connections past their time are closed.
const REAP_EVERY: Duration = Duration::from_secs(15);

/// The connector every pool opens connections with: TCP (with `server.connect_timeout`), then
/// TLS for `https://` upstreams with ALPN offering HTTP/2 and HTTP/1.1.
pub type Connector = HttpsConnector<HttpConnector>;

/// Why a request did not get an answer's head from its upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (TCP, TLS or the HTTP/2 handshake).
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// The connection failed while the request was sent or its answer awaited.
    #[error("the upstream connection failed")]
    Exchange(#[source] hyper::Error),
    /// A reused connection closed or was reset after the request was written, before an
    /// answer: most likely the upstream was closing it just then, or went away.
    #[error("the upstream closed a reused connection before answering")]
    Dropped(#[source] hyper::Error),
}

/// What sending a request gives: the answer, and the HTTP/1.1 connection it came on, to be
/// given back once its body has ended.
pub type Sent = (Response<Incoming>, Option<Pooled>);

/// A request on its way to the upstream, until its answer's head.
pub type Sending = Pin<Box<dyn Future<Output = Result<Sent, SendError>> + Send>>;

/// The connections to one upstream.
pub struct Pool {
    /// `scheme://authority/`, what the connector is asked to reach.
    target: Uri,
    scheme: Scheme,
    authority: Authority,
    h2c: bool,
    /// Renewed by a reload that keeps the pool (files it read may have changed).
    connector: ArcSwap<Connector>,
    /// A digest of the certificates and keys the connector was made from.
    material: AtomicU64,
    /// Counts the times the connector's certificates changed: a connection opened before
    /// the last change is not reused. (It wraps after 65,536 changes, each a reload.)
    era: AtomicU16,
    /// How long an idle connection is reused at most (`server.upstream_idle_timeout`).
    idle_timeout: Duration,
    /// The upstream's budget; a connection holds one of its places while it is open.
    budget: Arc<Budget>,
    /// The idle connections of each worker, and last those of every other thread.
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// Each worker's HTTP/2 connection, once it has one (and last every other thread's).
    h2: Box<[Mutex<Option<http2::SendRequest<RequestBody>>>]>,
    /// Held while a thread's h2c connection is being opened, so that one is.
    h2_connecting: Box<[tokio::sync::Mutex<()>]>,
    /// Told when a connection is given back.
    returned: Notify,
    reaping: AtomicBool,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    lease: Lease,
    /// Reused only before this.
    until: Instant,
}

/// A connection a request holds.
enum Conn {
    H1 {
        sender: http1::SendRequest<RequestBody>,
        /// Its lease, if it has answered before (`None`: new, driven by this thread).
        kept: Option<Lease>,
        /// The pool's era when it was opened.
        era: u16,
    },
    H2 {
        sender: http2::SendRequest<RequestBody>,
        reused: bool,
    },
}

impl Pool {
    /// Makes the pool of `scheme://authority`, opening connections with `connector` (made
    /// from certificates and keys of digest `material`) within `budget` and reusing idle ones
    /// for `idle_timeout` at most, for `workers` workers.
    #[allow(clippy::too_many_arguments)] // each is one setting of the upstream
    pub fn new(
        scheme: Scheme,
        authority: Authority,
        h2c: bool,
        connector: Connector,
        material: u64,
        idle_timeout: Duration,
        budget: Arc<Budget>,
        workers: usize,
    ) -> Pool {
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("a scheme and an authority make a URI");
        Pool {
            target,
            scheme,
            authority,
            h2c,
            connector: ArcSwap::from_pointee(connector),
            material: AtomicU64::new(material),
            era: AtomicU16::new(0),
            idle_timeout,
            budget,
            idle: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
            h2: (0..=workers).map(|_| Mutex::new(None)).collect(),
            h2_connecting: (0..=workers).map(|_| tokio::sync::Mutex::new(())).collect(),
            returned: Notify::new(),
            reaping: AtomicBool::new(false),
        }
    }

    /// The upstream's budget this pool opens connections within.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Opens this pool's connections from now on with `connector` (a reload that keeps the
    /// pool built it from the files as they are now, of digest `material`). If the
    /// certificates or keys changed, the connections opened before are not reused: idle ones
    /// close now, busy ones when their answers end, an HTTP/2 one when its streams do.
    pub fn renew_connector(&self, connector: Connector, material: u64) {
        self.connector.store(Arc::new(connector));
        if self.material.swap(material, Ordering::AcqRel) == material {
            return;
        }
        // After the connector: a connection opened in this era was opened with it.
        self.era.fetch_add(1, Ordering::AcqRel);
        for stack in &self.idle {
            lock(stack).clear();
        }
        for h2 in &self.h2 {
            *lock(h2) = None;
        }
    }

    /// Sends `request` (origin-form target; `Host` set for HTTP/1.1) at `now` and waits for
    /// the answer's head. With `new_connection`, an HTTP/1.1 request does not take an idle
    /// connection (unless the budget is spent and one is given back).
    pub fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
        new_connection: bool,
        now: Instant,
    ) -> Sending {
        let pool = Arc::clone(self);
        crate::pin_in_place(move || pool.exchange(request, new_connection, now))
    }

    // An `async` block rather than an `async fn`, which would keep the request twice (see
    // `Proxy::handle`).
    #[allow(clippy::manual_async_fn)]
    fn exchange(
        self: Arc<Self>,
        mut request: Request<RequestBody>,
        new_connection: bool,
        now: Instant,
    ) -> impl Future<Output = Result<Sent, SendError>> + Send {
        async move {
            loop {
                let conn = match self.ready_h2() {
                    Some(sender) => Conn::H2 {
                        sender,
                        reused: true,
                    },
                    None => match (!new_connection).then(|| self.take_idle(now)).flatten() {
                        Some(conn) => conn,
                        // Boxed apart: connecting (TCP, TLS, a handshake) is rare and would make
                        // every request's future, and the stack frame polling it, kilobytes larger.
                        None => crate::apart(|| self.connect_or_wait()).await?,
                    },
                };
                match conn {
                    Conn::H1 {
                        mut sender,
                        kept,
                        era,
                    } => {
                        let reused = kept.is_some();
                        if let Err(error) = sender.ready().await {
                            // A reused connection may have closed meanwhile; a new one that
                            // cannot take a request is the upstream's answer, not retried.
                            if reused {
                                continue;
                            }
                            return Err(SendError::Exchange(error));
                        }
                        match sender.try_send_request(request).await {
                            Ok(response) => {
                                // Read once per connection: an upstream says the same each time. A
                                // new connection's task runs on this thread, as this request does.
                                let lease = kept.unwrap_or_else(|| {
                                    Lease::new(self.keep_for(response.headers()), self.here(), era)
                                });
                                let pooled = Pooled {
                                    sender,
                                    lease,
                                    pool: self.clone(),
                                };
                                return Ok((response, Some(pooled)));
                            }
                            Err(mut error) => match error.take_message() {
                                // Not written: the connection closed first. Another one may
                                // take it.
                                Some(unsent) if reused => request = unsent,
                                _ => {
                                    let error = error.into_error();
                                    if reused && closed_before_answer(&error) {
                                        return Err(SendError::Dropped(error));
                                    }
                                    return Err(SendError::Exchange(error));
                                }
                            },
                        }
                    }
                    Conn::H2 { mut sender, reused } => {
                        self.to_h2(&mut request);
                        match sender.try_send_request(request).await {
                            Ok(response) => return Ok((response, None)),
                            Err(mut error) => {
                                let unsent = error.take_message();
                                let closed = sender.is_closed();
                                if closed {
                                    self.forget_closed_h2();
                                }
                                match unsent {
                                    Some(unsent) if closed && reused => request = unsent,
                                    _ => return Err(SendError::Exchange(error.into_error())),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Gives the request the absolute target HTTP/2 needs; `:authority` stands for `Host`.
    fn to_h2(&self, request: &mut Request<RequestBody>) {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        request.headers_mut().remove(header::HOST);
    }

    /// Returns this thread's HTTP/2 connection, if it has one open.
    fn ready_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        // Only `h2c`, or `https` by ALPN, can have one.
        if !self.h2c && self.scheme != Scheme::HTTPS {
            return None;
        }
        let h2 = lock(&self.h2[self.here()]);
        h2.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    fn forget_closed_h2(&self) {
        let mut h2 = lock(&self.h2[self.here()]);
        if h2.as_ref().is_some_and(|s| s.is_closed()) {
            *h2 = None;
        }
    }

    /// How long the connection of an answer with `headers` may be reused once idle: the
    /// pool's idle timeout, or less when the upstream said how long it keeps it.
    fn keep_for(&self, headers: &http::HeaderMap) -> Duration {
        match headers
            .get(super::headers::KEEP_ALIVE)
            .and_then(keep_alive_timeout)
        {
            Some(kept) => kept
                .saturating_sub(KEEP_ALIVE_MARGIN)
                .min(self.idle_timeout),
            None => self.idle_timeout,
        }
    }

    /// Returns the stack of the thread this runs on.
    fn here(&self) -> usize {
        let last = self.idle.len() - 1;
        crate::server::worker::current().map_or(last, |i| i.min(last))
    }

    /// Takes the most recently given back connection of this thread's stack that is still
    /// open and within its time; the others it passes are closed.
    fn take_idle(&self, now: Instant) -> Option<Conn> {
        self.take_idle_from(self.here(), now)
    }

    /// Like [`Pool::take_idle`], then from the other threads' stacks.
    fn take_idle_anywhere(&self) -> Option<Conn> {
        let (here, now) = (self.here(), Instant::now());
        let others = (0..self.idle.len()).filter(|&i| i != here);
        std::iter::once(here)
            .chain(others)
            .find_map(|stack| self.take_idle_from(stack, now))
    }

    fn take_idle_from(&self, stack: usize, now: Instant) -> Option<Conn> {
        let mut idle = lock(&self.idle[stack]);
        while let Some(entry) = idle.pop() {
            if now < entry.until && !entry.sender.is_closed() {
                return Some(Conn::H1 {
                    sender: entry.sender,
                    era: entry.lease.era,
                    kept: Some(entry.lease),
                });
            }
        }
        None
    }

    fn give_back(self: &Arc<Self>, sender: http1::SendRequest<RequestBody>, lease: Lease) {
        let home = usize::from(lease.home).min(self.idle.len() - 1);
        let keep_for = lease.keep_for();
        if keep_for.is_zero() || sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle[home]);
        // Under the lock: a change of certificates empties the stack after its new era.
        if lease.era != self.era.load(Ordering::Acquire) {
            return;
        }
        idle.push(Idle {
            sender,
            lease,
            until: Instant::now() + keep_for,
        });
        drop(idle);
        self.returned.notify_one();
        // Read first: a swap on every request would write the shared line each time.
        if !self.reaping.load(Ordering::Relaxed) && !self.reaping.swap(true, Ordering::Relaxed) {
            spawn_reaper(Arc::downgrade(self));
        }
    }

    /// Opens a connection when the budget has a place; otherwise waits for a place or for a
    /// connection given back, whichever comes first (the caller bounds the wait).
    async fn connect_or_wait(&self) -> Result<Conn, SendError> {
        if self.h2c {
            return self.connect_h2c().await;
        }
        loop {
            let place = match self.budget.connection_place() {
                Some(place) => place,
                None => {
                    let returned = self.returned.notified();
                    tokio::pin!(returned);
                    returned.as_mut().enable();
                    if let Some(conn) = self.take_idle_anywhere() {
                        return Ok(conn);
                    }
                    tokio::select! {
                        place = self.budget.wait_connection_place() => place,
                        () = returned => continue,
                    }
                }
            };
            return self.connect(place).await;
        }
    }

    /// Opens this thread's h2c connection, unless another request has just done so.
    async fn connect_h2c(&self) -> Result<Conn, SendError> {
        let _connecting = self.h2_connecting[self.here()].lock().await;
        if let Some(sender) = self.ready_h2() {
            return Ok(Conn::H2 {
                sender,
                reused: true,
            });
        }
        let place = self.budget.wait_connection_place().await;
        self.connect(place).await
    }

    async fn connect(&self, place: OwnedSemaphorePermit) -> Result<Conn, SendError> {
        // Before the connector: a renewal stores the connector first.
        let era = self.era.load(Ordering::Acquire);
        let io = Connector::clone(&self.connector.load())
            .call(self.target.clone())
            .await
            .map_err(SendError::Connect)?;
        let h2 = self.h2c || io.connected().is_negotiated_h2();
        let io = super::upstream::Budgeted::new(io, place);
        if h2 {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "an upstream HTTP/2 connection ended");
                }
            });
            // Shared only if the certificates did not change meanwhile.
            let mut shared = lock(&self.h2[self.here()]);
            if era == self.era.load(Ordering::Acquire) {
                *shared = Some(sender.clone());
            }
            drop(shared);
            Ok(Conn::H2 {
                sender,
                reused: false,
            })
        } else {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "an upstream connection ended");
                }
            });
            Ok(Conn::H1 {
                sender,
                kept: None,
                era,
            })
        }
    }

    /// Closes the idle connections past their time.
    fn reap(&self, now: Instant) {
        for stack in &self.idle {
            lock(stack).retain(|entry| now < entry.until && !entry.sender.is_closed());
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("upstream", &self.target)
            .field("h2c", &self.h2c)
            .finish_non_exhaustive()
    }
}

/// Closes a pool's expired idle connections until the pool is gone.
fn spawn_reaper(pool: Weak<Pool>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut every = tokio::time::interval(REAP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            match pool.upgrade() {
                Some(pool) => pool.reap(Instant::now()),
                None => return,
            }
        }
    });
}

/// An HTTP/1.1 connection that carried a request whose answer is still being read.
pub struct Pooled {
    sender: http1::SendRequest<RequestBody>,
    lease: Lease,
    pool: Arc<Pool>,
}

impl Pooled {
    /// Gives the connection back for reuse: its answer has been read to the end.
    pub fn give_back(self) {
        self.pool.give_back(self.sender, self.lease);
    }
}

/// How long a connection may be reused once idle, the stack it goes back to and the pool's
/// era it was opened in: in eight bytes, since it travels inside every answer's body, which
/// a request moves several times.
#[derive(Clone, Copy)]
struct Lease {
    keep_for_ms: u32,
    home: u16,
    era: u16,
}

impl Lease {
    fn new(keep_for: Duration, home: usize, era: u16) -> Lease {
        Lease {
            keep_for_ms: u32::try_from(keep_for.as_millis()).unwrap_or(u32::MAX),
            // At most `server.workers` (256) plus one.
            home: u16::try_from(home).unwrap_or(u16::MAX),
            era,
        }
    }

    fn keep_for(self) -> Duration {
        Duration::from_millis(self.keep_for_ms.into())
    }
}

/// Tells whether `error` says the connection ended (closed or reset) before an answer came.
fn closed_before_answer(error: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    if error.is_incomplete_message() {
        return true;
    }
    let io = std::error::Error::source(error).and_then(|e| e.downcast_ref::<std::io::Error>());
    io.is_some_and(|e| {
        matches!(
            e.kind(),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        )
    })
}

/// Reads how long an upstream keeps an idle connection from its `Keep-Alive` header
/// (`timeout=5, max=1000`); `None` if the header does not say.
fn keep_alive_timeout(value: &http::HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    text.split(',').find_map(|param| {
        let (name, seconds) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        let seconds = seconds.trim().trim_matches('"');
        seconds.parse::<u64>().ok().map(Duration::from_secs)
    })
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooled").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Builds the connector: `tls` verifies `https://` upstreams (as `server_name`, if given,
/// instead of the host); TCP connects give up after `connect_timeout`.
pub fn connector(
    tls: rustls::ClientConfig,
    server_name: Option<&str>,
    connect_timeout: Duration,
) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match server_name.and_then(|n| ServerName::try_from(n.to_owned()).ok()) {
        Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
        None => builder,
    };
    builder.enable_all_versions().wrap_connector(http)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A listener on loopback that counts the connections it accepts and hands each to
    /// `serve` in a task of its own. Returns its address and the count.
    async fn counting_listener<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (addr, accepted)
    }

    /// An upstream that answers every request `200 ok` with keep-alive, and closes each
    /// connection `close_after` after its first answer if that is given, without saying so.
    /// Returns its address and the count of connections it accepted.
    async fn upstream(close_after: Option<Duration>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        upstream_saying("", close_after).await
    }

    /// [`upstream`], with `fields` (header lines, each ending in CRLF) in every answer.
    async fn upstream_saying(
        fields: &'static str,
        close_after: Option<Duration>,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        counting_listener(move |mut tcp| async move {
            let mut buf = vec![0; 4096];
            loop {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{fields}\r\nok");
                if tcp.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                if let Some(after) = close_after {
                    tokio::time::sleep(after).await;
                    return;
                }
            }
        })
        .await
    }

    /// An upstream speaking h2c that answers `ok`, and the count of connections it accepted.
    async fn h2c_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        counting_listener(|tcp| async move {
            let service = hyper::service::service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(
                    crate::proxy::ProxyBody::full("ok"),
                ))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        })
        .await
    }

    fn idle_count(pool: &Pool) -> usize {
        pool.idle.iter().map(|stack| lock(stack).len()).sum()
    }

    const IDLE: Duration = Duration::from_secs(30);

    fn pool_for(addr: std::net::SocketAddr) -> Arc<Pool> {
        pool_keeping(addr, IDLE)
    }

    fn pool_keeping(addr: std::net::SocketAddr, idle_timeout: Duration) -> Arc<Pool> {
        pool_of(addr, idle_timeout, 4, 1)
    }

    fn pool_of(
        addr: std::net::SocketAddr,
        idle_timeout: Duration,
        places: usize,
        workers: usize,
    ) -> Arc<Pool> {
        pool_speaking(addr, false, idle_timeout, places, workers)
    }

    fn pool_speaking(
        addr: std::net::SocketAddr,
        h2c: bool,
        idle_timeout: Duration,
        places: usize,
        workers: usize,
    ) -> Arc<Pool> {
        let budget = super::super::upstream::Budgets::new([(String::new(), places)])
            .get("")
            .unwrap();
        Arc::new(Pool::new(
            Scheme::HTTP,
            addr.to_string().parse().unwrap(),
            h2c,
            connector(
                crate::tls::client_config(false, None).unwrap(),
                None,
                Duration::from_secs(1),
            ),
            0,
            idle_timeout,
            budget,
            workers,
        ))
    }

    /// A thread of its own driving a current-thread runtime, as worker `index` (or as any
    /// other thread), until the returned sender is dropped.
    fn thread_as(
        index: Option<usize>,
    ) -> (tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>) {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            if let Some(index) = index {
                crate::server::worker::enter(index);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(runtime.handle().clone()).unwrap();
            let _ = runtime.block_on(stopped);
        });
        (handle_rx.recv().unwrap(), stop)
    }

    /// Sends one request from `thread` and gives its HTTP/1.1 connection back.
    async fn get_on(thread: &tokio::runtime::Handle, pool: &Arc<Pool>) {
        let pool = pool.clone();
        let done = thread.spawn(async move { get(&pool).await.map(Pooled::give_back) });
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("answered")
            .unwrap();
    }

    async fn get(pool: &Arc<Pool>) -> Option<Pooled> {
        let request = Request::builder()
            .uri("/")
            .header(header::HOST, "upstream")
            .body(RequestBody::EMPTY)
            .unwrap();
        let (response, conn) = pool.send(request, false, Instant::now()).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        conn
    }

    #[tokio::test]
    async fn a_connection_given_back_is_reused_and_closed_once_idle_too_long() {
        let (addr, accepted) = upstream(None).await;
        let pool = pool_for(addr);
        for _ in 0..5 {
            get(&pool)
                .await
                .expect("an HTTP/1.1 connection")
                .give_back();
            assert_eq!(idle_count(&pool), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        pool.reap(Instant::now() + IDLE - Duration::from_secs(1));
        assert_eq!(idle_count(&pool), 1, "reaped before its time");
        pool.reap(Instant::now() + IDLE);
        assert_eq!(idle_count(&pool), 0);
    }

    #[tokio::test]
    async fn each_worker_reuses_its_own_connections_and_anothers_only_once_the_budget_is_spent() {
        let (addr, accepted) = upstream(None).await;
        let pool = pool_of(addr, IDLE, 2, 2);
        let (first, _stop_first) = thread_as(Some(0));
        let (second, _stop_second) = thread_as(Some(1));
        let (other, _stop_other) = thread_as(None);
        let opened = || accepted.load(Ordering::SeqCst);

        get_on(&first, &pool).await;
        get_on(&first, &pool).await;
        assert_eq!(opened(), 1);
        // The first worker's idle connection would wake the first worker for each request.
        get_on(&second, &pool).await;
        assert_eq!(
            opened(),
            2,
            "the second worker took the first one's connection"
        );
        get_on(&second, &pool).await;
        get_on(&first, &pool).await;
        assert_eq!(opened(), 2);
        // The budget (two) is spent: a thread with no connection of its own takes one, and it
        // goes back to the worker that drives it.
        get_on(&other, &pool).await;
        assert_eq!(opened(), 2);
        let stacked: Vec<usize> = pool.idle.iter().map(|stack| lock(stack).len()).collect();
        assert_eq!(stacked, [1, 1, 0]);
    }

    #[tokio::test]
    async fn each_worker_has_an_http2_connection_of_its_own() {
        let (addr, accepted) = h2c_upstream().await;
        let pool = pool_speaking(addr, true, IDLE, 4, 2);
        let (first, _stop_first) = thread_as(Some(0));
        let (second, _stop_second) = thread_as(Some(1));
        get_on(&first, &pool).await;
        get_on(&first, &pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        get_on(&second, &pool).await;
        get_on(&second, &pool).await;
        get_on(&first, &pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    fn renew(pool: &Pool, material: u64) {
        let tls = crate::tls::client_config(false, None).unwrap();
        pool.renew_connector(connector(tls, None, Duration::from_secs(1)), material);
    }

    #[tokio::test]
    async fn connections_opened_before_the_certificates_changed_are_not_reused() {
        let (addr, accepted) = upstream(None).await;
        let pool = pool_for(addr);
        let opened = || accepted.load(Ordering::SeqCst);
        get(&pool).await.unwrap().give_back();
        let busy = get(&pool).await.unwrap();
        assert_eq!(opened(), 1);

        // Renewed from the same certificates: the connections stay.
        renew(&pool, 0);
        busy.give_back();
        assert_eq!(idle_count(&pool), 1);
        let busy = get(&pool).await.unwrap();
        get(&pool).await.unwrap().give_back();
        assert_eq!((opened(), idle_count(&pool)), (2, 1));

        // Renewed from others: the idle one closes now, the busy one when it is given back.
        renew(&pool, 7);
        assert_eq!(idle_count(&pool), 0);
        busy.give_back();
        assert_eq!(idle_count(&pool), 0);
        get(&pool).await.unwrap().give_back();
        get(&pool).await.unwrap().give_back();
        assert_eq!((opened(), idle_count(&pool)), (3, 1));
    }

    #[tokio::test]
    async fn an_http2_connection_opened_before_the_certificates_changed_is_not_reused() {
        let (addr, accepted) = h2c_upstream().await;
        let pool = pool_speaking(addr, true, IDLE, 4, 1);
        let opened = || accepted.load(Ordering::SeqCst);
        get(&pool).await;
        renew(&pool, 0);
        get(&pool).await;
        assert_eq!(opened(), 1);
        renew(&pool, 7);
        get(&pool).await;
        get(&pool).await;
        assert_eq!(opened(), 2);
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_idle_timeout_is_not_reused() {
        let (addr, accepted) = upstream(None).await;
        let pool = pool_keeping(addr, Duration::from_millis(300));
        get(&pool).await.unwrap().give_back();
        get(&pool).await.unwrap().give_back();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        get(&pool).await.unwrap().give_back();
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "reused past its time");
        assert_eq!(idle_count(&pool), 1, "the expired connection was kept");
    }

    #[tokio::test]
    async fn a_connection_is_reused_until_a_second_before_the_upstream_said_it_closes() {
        // The upstream keeps idle connections for 2 s and says so, as a Node service does
        // (5 s there); it never closes one here, so only the pool decides.
        let (addr, accepted) = upstream_saying("keep-alive: timeout=2\r\n", None).await;
        let pool = pool_for(addr);
        get(&pool).await.unwrap().give_back();
        tokio::time::sleep(Duration::from_millis(500)).await;
        get(&pool).await.unwrap().give_back();
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "not reused within its time"
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        get(&pool).await.unwrap().give_back();
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "reused although the upstream may be closing it"
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_keeps_a_second_or_less_is_not_kept() {
        let (addr, accepted) = upstream_saying("Keep-Alive: timeout=1, max=100\r\n", None).await;
        let pool = pool_for(addr);
        get(&pool).await.unwrap().give_back();
        assert_eq!(idle_count(&pool), 0);
        get(&pool).await.unwrap().give_back();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_keep_alive_timeout_is_read_from_any_place_of_the_header() {
        let read = |text: &'static str| keep_alive_timeout(&http::HeaderValue::from_static(text));
        assert_eq!(read("timeout=5"), Some(Duration::from_secs(5)));
        assert_eq!(read("timeout=5, max=1000"), Some(Duration::from_secs(5)));
        assert_eq!(read("max=100, Timeout = 15"), Some(Duration::from_secs(15)));
        assert_eq!(read("timeout=\"7\""), Some(Duration::from_secs(7)));
        assert_eq!(read("max=100"), None);
        assert_eq!(read("timeout=soon"), None);
        assert_eq!(read("timeout=-1"), None);
        assert_eq!(read(""), None);
    }

    #[tokio::test]
    async fn a_connection_not_given_back_is_not_reused() {
        let (addr, accepted) = upstream(None).await;
        let pool = pool_for(addr);
        drop(get(&pool).await);
        drop(get(&pool).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(idle_count(&pool), 0);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_passed_over() {
        let (addr, accepted) = upstream(Some(Duration::from_millis(20))).await;
        let pool = pool_for(addr);
        for round in 1..=3 {
            get(&pool)
                .await
                .expect("an HTTP/1.1 connection")
                .give_back();
            // The upstream closes the connection; the pool notices it before the next request.
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn an_upstream_that_closes_every_new_connection_gets_one_attempt_per_request() {
        let (addr, accepted) = counting_listener(|tcp| async move { drop(tcp) }).await;
        let pool = pool_for(addr);
        let request = Request::builder()
            .uri("/")
            .header(header::HOST, "upstream")
            .body(RequestBody::EMPTY)
            .unwrap();
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            pool.send(request, false, Instant::now()),
        )
        .await
        .expect("the failure is reported, not retried until the caller gives up");
        assert!(sent.is_err());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_stay_within_the_budget_and_a_waiting_request_takes_one_given_back() {
        let (addr, accepted) = upstream(None).await;
        let pool = pool_for(addr);
        // The budget (4) is spent by connections whose answers are still held.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(get(&pool).await.expect("an HTTP/1.1 connection"));
        }
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { get(&pool).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a fifth connection was opened");
        held.pop().unwrap().give_back();
        let conn = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting request took the connection given back")
            .unwrap();
        assert!(conn.is_some());
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }
}
