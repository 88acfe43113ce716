//! The accept loop: HTTP/1.1 and HTTP/2 (prior knowledge) on one port, every client
//! connection bounded in number, in time and in what it may buffer, and a graceful and
//! bounded shutdown.
//!
//! Each connection runs in its own task beside a [`watchdog`] that ends it when it sends no
//! request head within `header_timeout` of the accept (HTTP/2: preface and first stream
//! alike), has no request in flight for `idle_timeout`, begins a later HTTP/1 head and does
//! not finish it within one to two `header_timeout`s, or leaves an answer unread for
//! `write_timeout`. hyper bounds the head's size and count and, for HTTP/2, the streams and
//! flow-control windows.

pub mod conn;
pub mod deadline;
pub mod goaway;
pub mod http;
pub mod side;
mod streams;
pub mod transport;
pub mod watchdog;
pub mod worker;

use crate::config::ConnectionLimits;
use crate::shutdown::Shutdown;
use crate::tls::ClientCert;
use crate::BoxError;
use conn::{CancelBudget, ClientConn, Counted, Draining};
use deadline::KeptTimers;
use goaway::ClientSocket;
use http::{Connection, Protocols, Served};
use side::SideWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use transport::{Accepted, Listener, Transport};
use watchdog::{Timeouts, Verdict, Watchdog};

/// File descriptors kept free of client connections for the identity service, the admin
/// listener, secret files and the like.
const RESERVED_FDS: u64 = 128;
/// The most connections a derived `max_connections` allows.
const MAX_DERIVED_CONNECTIONS: u64 = 65_536;
/// How often a repeated warning (connections refused, accept failing) is written at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Returns the default `server.max_connections`: half the open-file limit less a reserve,
/// since every client connection may hold an upstream connection as well.
pub fn derived_max_connections() -> usize {
    #[cfg(unix)]
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    #[cfg(not(unix))]
    let soft = 1024;
    (soft.saturating_sub(RESERVED_FDS) / 2).clamp(16, MAX_DERIVED_CONNECTIONS) as usize
}

/// Raises the soft open-file limit to the hard one, as servers do at start; returns it.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    return rlimit::increase_nofile_limit(u64::MAX).ok();
    #[cfg(not(unix))]
    None
}

/// The listener's TLS configuration, replaced when its files change.
pub type TlsConfig = Arc<arc_swap::ArcSwap<rustls::ServerConfig>>;

/// The places of `max_connections`, for listeners that share them (the workers').
pub fn connection_slots(limits: &ConnectionLimits) -> Arc<Semaphore> {
    let max = limits
        .max_connections
        .unwrap_or_else(derived_max_connections);
    Arc::new(Semaphore::new(max))
}

/// Serves `listener` (over TLS if `tls` is given) until `shutdown`, with a service made per
/// connection by `make`; then lets requests in flight (and upgraded tunnels) finish for up
/// to `grace` and drops the rest. Returns the deadline it drained by: shutdown's moment
/// plus `grace`. `slots` are the places of `max_connections` when several listeners share them (the
/// workers'); `None`: the listener's own.
pub async fn serve<S>(
    listener: impl Into<Listener>,
    make: impl Fn(&Arc<ClientConn>) -> S + Send + Sync + 'static,
    limits: ConnectionLimits,
    slots: Option<Arc<Semaphore>>,
    tls: Option<TlsConfig>,
    shutdown: Shutdown,
    grace: Duration,
) -> Instant
where
    S: Served,
{
    let listener = listener.into();
    let slots = slots.unwrap_or_else(|| connection_slots(&limits));
    let protocols = Arc::new(Protocols::new(&limits));
    let make = Arc::new(make);
    let max_connections = limits
        .max_connections
        .unwrap_or_else(derived_max_connections);
    let timeouts = Timeouts {
        header: limits.header_timeout,
        idle: limits.idle_timeout,
        write: limits.write_timeout,
    };
    let cancel_budget = CancelBudget {
        max: limits.max_cancelled_streams,
        window: limits.cancelled_streams_window,
    };
    // Every connection holds a receiver; `closed` tells when the last one (and its tunnel)
    // ended.
    let (running, running_rx) = watch::channel(());
    let timers = Arc::new(KeptTimers::default());
    let mut refused = Throttle::default();
    let mut accept_failed = Throttle::default();
    // One wait for the whole loop, not one made and registered anew per connection.
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // That one connection went before it was taken (a client's reset): the next
                // is served at once. A pause here would let a client stall every accept.
                Err(error) if lost_before_accept(&error) => continue,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    if let Some(more) = accept_failed.note() {
                        tracing::warn!(%error, repeated = more, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(more) = refused.note() {
                tracing::warn!(
                    %peer, max_connections, repeated = more,
                    "connection refused: server.max_connections are in use"
                );
            }
            drop(stream);
            continue;
        };
        let accepted = Instant::now();
        let draining = Draining {
            shutdown: shutdown.clone(),
            grace,
            _running: running_rx.clone(),
        };
        let (protocols, make, tls) = (protocols.clone(), make.clone(), tls.clone());
        let timers = timers.clone();
        // Boxed: tokio moves a task's future several times as it spawns it, and once more
        // when it ends; a box is 8 bytes where the connection's future is about 1 KB.
        tokio::spawn(crate::pin_in_place(move || async move {
            // The handshake counts against the time to the first request head.
            let deadline = accepted + timeouts.header;
            let (transport, client_cert) = match (stream, tls) {
                (Accepted::Unix(stream), _) => (Transport::Unix(stream), None),
                (Accepted::Tcp(stream), None) => (Transport::Plain(stream), None),
                (Accepted::Tcp(stream), Some(tls)) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
                    // Boxed: the handshake's 1.3 KB would otherwise be part of every
                    // connection's task, plain ones too, for as long as it lives.
                    let handshake = Box::pin(acceptor.accept(stream));
                    match tokio::time::timeout_at(deadline, handshake).await {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .and_then(|der| ClientCert::from_der(der));
                            (Transport::Tls(Box::new(stream)), cert)
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake not done within server.header_timeout");
                            return;
                        }
                    }
                }
            };
            let client = Arc::new(ClientConn::new(
                peer,
                Some(slot),
                cancel_budget,
                draining,
                client_cert,
                timers,
            ));
            let service = Counted::new(make(&client), client.clone());
            let socket = ClientSocket::new(transport, client.signals.clone());
            // Boxed: hyper's connection is about 3 KB, and the task's future, moved on every
            // change of the task's stage, is kept small.
            let connection = crate::pin_in_place(|| Connection::new(protocols, socket, service));
            drive(connection, client, timeouts, accepted).await;
        }));
    }
    let deadline = Instant::now() + grace;
    drop(listener);
    drop(running_rx);
    if tokio::time::timeout_at(deadline, running.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = grace.as_secs_f32(),
            "requests still in flight after the shutdown grace period were dropped"
        );
    }
    deadline
}

/// Whether a failed accept lost only the connection it was taking, not the listener's
/// ability to take the next.
fn lost_before_accept(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    )
}

/// How long a connection told to calm down may take to go.
const CALM_CLOSE: Duration = Duration::from_secs(1);

/// What woke a connection's driver.
enum Event {
    /// The connection ended, with an error or not.
    Ended(Option<BoxError>),
    Shutdown,
    Calm,
    Timer,
}

/// Drives one connection under its watchdog until it ends, is ended, or shutdown has
/// waited `grace` for it.
async fn drive<S>(
    mut connection: Pin<Box<Connection<Counted<S>>>>,
    client: Arc<ClientConn>,
    timeouts: Timeouts,
    accepted: Instant,
) where
    S: Served,
{
    let peer = client.peer();
    let grace = client.draining.grace;
    let mut watchdog = Watchdog::new(timeouts, accepted);
    // Not a timer firing now to ask: that took a turn of the loop and made tokio wake its
    // driver (a write to its eventfd) for every new connection.
    let mut next = watchdog.first_check();
    // Once a graceful close has begun: when the connection is dropped regardless.
    let mut closing: Option<Instant> = None;
    let side = SideWaker::default();
    let mut shutdown_signal = std::pin::pin!(client.draining.shutdown.wait());
    let mut calm = std::pin::pin!(client.calm_requested());
    let mut timer = std::pin::pin!(tokio::time::sleep_until(next));
    loop {
        let wake = closing.map_or(next, |deadline| deadline.min(next));
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
            side.raise();
        }
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(ended) = connection.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(ended.err()));
            }
            let Some(mut side_cx) = side.woken(cx) else {
                return Poll::Pending;
            };
            let event =
                if closing.is_none() && shutdown_signal.as_mut().poll(&mut side_cx).is_ready() {
                    Event::Shutdown
                } else if calm.as_mut().poll(&mut side_cx).is_ready() {
                    Event::Calm
                } else if timer.as_mut().poll(&mut side_cx).is_ready() {
                    Event::Timer
                } else {
                    return Poll::Pending;
                };
            // The others were not looked at: they are, next time.
            side.raise();
            Poll::Ready(event)
        })
        .await;
        match event {
            Event::Ended(error) => {
                if let Some(error) = error {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            Event::Shutdown => {
                connection.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + grace);
            }
            Event::Calm => {
                calm.set(client.calm_requested());
                let budget = client.cancel_budget();
                tracing::warn!(
                    %peer, cancelled = budget.max + 1, window_s = budget.window.as_secs_f32(),
                    "client cancelled too many forwarded requests: GOAWAY ENHANCE_YOUR_CALM"
                );
                // hyper's own GOAWAY is the write that carries ours out first.
                client.signals.flip();
                connection.as_mut().graceful_shutdown();
                let deadline = Instant::now() + CALM_CLOSE;
                closing = Some(closing.map_or(deadline, |c| c.min(deadline)));
            }
            Event::Timer => {
                let now = Instant::now();
                if closing.is_some_and(|deadline| now >= deadline) {
                    tracing::debug!(%peer, "connection dropped: it did not close in time");
                    return;
                }
                match watchdog.check(client.snapshot(), now) {
                    Verdict::CheckAt(at) => next = at,
                    Verdict::Close(reason) => {
                        tracing::debug!(%peer, reason = reason.as_str(), "closing connection");
                        if closing.is_none() {
                            connection.as_mut().graceful_shutdown();
                            closing = Some(now + timeouts.header);
                        }
                        next = closing.unwrap_or(now);
                    }
                    Verdict::Drop(reason) => {
                        tracing::debug!(%peer, reason = reason.as_str(), "connection dropped");
                        return;
                    }
                }
            }
        }
    }
}

/// A warning that repeats is written at most once per [`WARN_EVERY`], with the count of
/// the times in between.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Notes one more occurrence; returns how many went unwritten if this one is to be written.
    fn note(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + WARN_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::lost_before_accept;
    use std::io::Error;

    #[test]
    fn a_connection_lost_before_its_accept_does_not_pause_the_listener() {
        // Linux's errno values: the connection's own end, and the process out of descriptors.
        for lost in [libc::ECONNABORTED, libc::ECONNRESET] {
            assert!(
                lost_before_accept(&Error::from_raw_os_error(lost)),
                "{lost}"
            );
        }
        for exhausted in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(
                !lost_before_accept(&Error::from_raw_os_error(exhausted)),
                "{exhausted}"
            );
        }
    }
}
