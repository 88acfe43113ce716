//! The hyper service of the proxy: one struct, the request phases as plain functions.

use super::body::{body_timeout_in, BodyPace, Metered, ProxyBody, RequestBody, TimedBody};
use super::error::{Fault, ProxyError};
use super::headers::{is_valid_host, remove_hop_by_hop, ClientAddress};
use super::inspect::{inspect, inspect_unpassed, passes_by_head, Inspected};
use super::path::{self, PathError};
use super::pool::SendError;
use super::record::Record;
use super::replay::Replay;
use super::route::{Route, RouteTable};
use super::upgrade::{self, TunnelParts};
use super::upstream::{Exchange, UpstreamBody};
use crate::config::{ForwardingHeaders, ServerConfig};
use crate::identity::stats::ReplayOutcome;
use crate::identity::Rejection;
use crate::metrics::{Metrics, RouteMetrics};
use crate::server::conn::ClientConn;
use crate::server::goaway::SocketSignals;
use arc_swap::ArcSwap;
use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use hyper::upgrade::OnUpgrade;
use ipnet::IpNet;
use prometheus_client::metrics::gauge::Gauge;
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, SemaphorePermit};

/// The state shared by every connection: routes, the upstream client and the limits.
pub struct Proxy {
    routes: RouteTable,
    upstream_timeout: Duration,
    token_wait: Duration,
    replay_body_limit: u64,
    /// Bytes of replay bodies that may still be kept, all requests together.
    replay_memory: Semaphore,
    /// How slowly a client may send a request body.
    body_pace: BodyPace,
    max_uri_bytes: usize,
    trusted_proxies: Vec<IpNet>,
    forwarding_headers: ForwardingHeaders,
    tunnel_idle_timeout: Duration,
    /// The series of requests no route took.
    unrouted: Arc<RouteMetrics>,
    /// One `info` line per request (`server.access_log`).
    access_log: bool,
}

/// The route a request goes to, and what judging it gave.
struct Picked<'a> {
    route: &'a Route,
    /// The judged path, if judging changed the request's.
    judged_path: Option<String>,
    /// The `Host` the client asked for, for `X-Forwarded-Host`.
    forwarded_host: Option<HeaderValue>,
}

/// How a request body travels: decided at once, or to be read and kept first.
enum Kept<'a> {
    /// Streamed (or empty); `true` if the request can be replayed from its head alone.
    Decided(RequestBody, bool),
    /// Small enough to keep, its share of `server.replay_memory` taken.
    Keep(Incoming, SemaphorePermit<'a>),
}

impl Proxy {
    /// Creates the proxy from its routes, its upstream client and the `[server]` limits.
    pub fn new(routes: RouteTable, server: &ServerConfig, metrics: &Metrics) -> Proxy {
        let replay_memory = usize::try_from(server.replay_memory)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Proxy {
            routes,
            upstream_timeout: server.upstream_timeout,
            token_wait: server.token_wait,
            replay_body_limit: server.replay_body_limit,
            replay_memory: Semaphore::new(replay_memory),
            body_pace: BodyPace {
                gap: server.body_timeout,
                min_rate: server.min_body_rate,
            },
            max_uri_bytes: server.max_uri_bytes,
            trusted_proxies: server.trusted_proxies.clone(),
            forwarding_headers: server.forwarding_headers,
            tunnel_idle_timeout: server.tunnel_idle_timeout,
            unrouted: metrics.route(UNROUTED),
            access_log: server.access_log,
        }
    }

    /// Returns the route table.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Returns the bytes of `server.replay_memory` not held by kept bodies now.
    pub fn replay_memory_free(&self) -> usize {
        self.replay_memory.available_permits()
    }

    /// Serves one request: forwards it, or answers with the failure's status and a short body.
    ///
    /// `request` is taken from its place when it is taken apart to go upstream; it is
    /// `None` afterwards. This and the steps below return an `async` block rather than being
    /// `async fn`s: an `async fn`'s future keeps its arguments apart from the locals they are
    /// moved into, so the client's request took its room twice at each step (and was copied
    /// once more). The request is lent, not moved, for the same reason: each step it was
    /// moved into kept a copy of its own, 264 bytes written afresh per request and step.
    #[allow(clippy::manual_async_fn)] // the request once, not twice (above)
    pub fn handle<'a>(
        &'a self,
        request: &'a mut Option<Request<Incoming>>,
        client: &'a ProxyService,
        record: &'a mut Record,
    ) -> impl Future<Output = Response<ProxyBody>> + 'a {
        async move {
            let started = record.started();
            let Some(client_request) = request.as_ref() else {
                // Never so: `call` lends it with the request in it.
                return ProxyError::Internal.to_response();
            };
            let method = client_request.method().clone();
            if self.access_log {
                record.log(&method, client_request.uri().path());
            }
            let result = self.handle_inner(request, client, record).await;
            let status = match &result {
                Ok((response, _)) => response.status(),
                Err(error) => error.classify().0,
            };
            record.answered(status);
            match result {
                Ok((response, route)) => {
                    if tracing::level_enabled!(tracing::Level::DEBUG) {
                        forwarded(&method, route, response.status(), started);
                    }
                    response
                }
                Err(error) => failed(error, &method, client, record, started),
            }
        }
    }

    #[allow(clippy::manual_async_fn)] // the request once, not twice: see `handle`
    fn handle_inner<'a: 'b, 'b>(
        &'a self,
        request: &'b mut Option<Request<Incoming>>,
        client: &'b ProxyService,
        record: &'b mut Record,
    ) -> impl Future<Output = Result<(Response<ProxyBody>, &'a Route), ProxyError>> + 'b {
        async move {
            let Some(client_request) = request.as_ref() else {
                return Err(ProxyError::Internal);
            };
            // The request filter, the token and the rewrite: the request as it goes upstream.
            // Written here, not in a step of its own: the step's result (the request and what
            // its answer needs of it, about 600 bytes) was moved twice on its way out. The
            // client's request is taken apart before it goes upstream, so it takes no room in
            // this future while the upstream answers.
            let Picked {
                route,
                judged_path,
                forwarded_host,
            } = self.filter_and_pick(client_request, client)?;
            record.set_route(&route.metrics);

            // Token: the ready-made header, or a short wait while one is being fetched.
            let sent = match route.account.usable_header() {
                Some(value) => value,
                // The rare path is boxed so that every request's future stays small.
                None => crate::apart(|| route.account.header_or_wait(self.token_wait))
                    .await
                    .map_err(|cause| ProxyError::TokenUnavailable {
                        account: route.account.name().to_owned(),
                        cause,
                    })?,
            };

            // Rewrite.
            let Some(client_request) = request.take() else {
                return Err(ProxyError::Internal);
            };
            let (mut parts, body) = client_request.into_parts();
            let asked = upgrade::requested(&parts.headers, &route.upgrades);
            rewrite(&mut parts, route, judged_path.as_deref())?;
            // The client's side of an upgrade never travels with the request; one that is not
            // allowed is dropped here, so hyper closes rather than hands the connection over.
            let on_upgrade = parts.extensions.remove::<OnUpgrade>();
            let upgrade = match asked {
                Some(protocol) => {
                    upgrade::keep_upgrade_headers(&mut parts.headers, protocol.clone());
                    on_upgrade.map(|on_upgrade| (on_upgrade, protocol))
                }
                None => None,
            };
            let upgrading = upgrade.is_some();
            // Keep a small body for a replay, or stream it. The head is kept without the
            // forwarding headers: a replay makes them again from the same client, and most
            // requests are never replayed.
            let socket = &client.0.conn.signals;
            let (body, replay) = match self.stream_or_budget(route, body, !upgrading, socket) {
                Kept::Decided(body, replay) => (
                    body,
                    replay.then(|| Replay::bodiless(&parts, forwarded_host.clone())),
                ),
                Kept::Keep(body, budget) => {
                    let host = forwarded_host.clone();
                    crate::apart(|| self.keep(&parts, host, body, budget, socket.clone())).await?
                }
            };
            client.0.address.set_forwarding_headers(
                &mut parts.headers,
                forwarded_host,
                self.forwarding_headers,
            );
            parts.headers.insert(header::AUTHORIZATION, sent.clone());
            if self.access_log {
                record.log_forward(&route.upstream_text, &sent, &route.account);
            }
            let request = Request::from_parts(parts, body);

            // Forward. An answer that passes as it came (no upgrade, no switch, not possibly a
            // rejection: most of them) is answered here, the others apart. The match awaits in
            // no arm: an answer matched across a wait is stored in this future, and written
            // there for every request (the forward's result, the head's judgement and the
            // answer were, about 700 bytes).
            let settling: Settling<'_> = match self.forward(route, request, client, false).await {
                Ok(response)
                    if !upgrading && response.status() != http::StatusCode::SWITCHING_PROTOCOLS =>
                {
                    if passes_by_head(&response) {
                        return Ok((passed(response.map(ProxyBody::Upstream)), route));
                    }
                    crate::pin_in_place(|| {
                        self.judge(response, route, &sent, replay.as_ref(), client)
                    })
                }
                answered => crate::pin_in_place(|| {
                    self.settle(answered, route, &sent, replay.as_ref(), upgrade, client)
                }),
            };
            Ok((settling.await?, route))
        }
    }

    /// Judges an answer that [`passes_by_head`] did not pass (a 401, or a small JSON answer,
    /// which is read) and recovers from a rejection. The answers of a GraphQL API come this
    /// way: a future of its own, small, with the rare recovery apart.
    async fn judge(
        &self,
        response: Response<UpstreamBody>,
        route: &Route,
        sent: &HeaderValue,
        replay: Option<&Replay<'_>>,
        client: &ProxyService,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (original, code) = match inspect_unpassed(response).await? {
            Inspected::Pass(response) => return Ok(passed(response)),
            Inspected::Rejected(original, code) => (original, code),
        };
        crate::apart(|| self.recover(route, sent, original, code, replay, client)).await
    }

    /// Settles what else [`Proxy::forward`] brought back: sends the request once more if the
    /// upstream closed a reused connection under it, makes the tunnel of an upgrade, refuses a
    /// switch of protocols that was not asked for, and judges the answer.
    async fn settle(
        &self,
        answered: Result<Response<UpstreamBody>, ProxyError>,
        route: &Route,
        sent: &HeaderValue,
        replay: Option<&Replay<'_>>,
        upgrade: Option<(OnUpgrade, HeaderValue)>,
        client: &ProxyService,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let response = match answered {
            Err(ProxyError::UpstreamDropped(error)) => {
                self.resend(route, sent, replay, client, error).await?
            }
            answered => answered?,
        };
        if let Some((on_upgrade, asked)) = upgrade {
            let tunnel = TunnelParts {
                account: route.account.clone(),
                sent: sent.clone(),
                conn: client.0.conn.clone(),
                idle_timeout: self.tunnel_idle_timeout,
            };
            return Ok(upgrade::tunnel(response, on_upgrade, &asked, tunnel));
        }
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProxyError::UpstreamSwitched);
        }
        if passes_by_head(&response) {
            return Ok(passed(response.map(ProxyBody::Upstream)));
        }
        self.judge(response, route, sent, replay, client).await
    }

    /// Recovers from the rejection `code` of the token `sent` ([`Proxy::after_rejection`]),
    /// counted.
    async fn recover(
        &self,
        route: &Route,
        sent: &HeaderValue,
        original: Response<ProxyBody>,
        code: String,
        replay: Option<&Replay<'_>>,
        client: &ProxyService,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        route.account.stats().rejection(&code);
        let (response, outcome) = self
            .after_rejection(route, sent, original, replay, client)
            .await?;
        route.account.stats().replay(outcome);
        Ok(passed(response))
    }

    /// The request filter and the choice of upstream: refuses what this proxy never serves
    /// and judges the path, then picks the route by the judged path, which must be the
    /// route the path named before its dot segments were removed.
    fn filter_and_pick<'a>(
        &'a self,
        request: &Request<Incoming>,
        client: &ProxyService,
    ) -> Result<Picked<'a>, ProxyError> {
        if client.0.conn.is_calmed() {
            return Err(ProxyError::Calmed);
        }
        match *request.method() {
            Method::CONNECT => return Err(ProxyError::Connect),
            Method::TRACE => return Err(ProxyError::Trace),
            _ => {}
        }
        let target_len = request
            .uri()
            .path_and_query()
            .map_or(0, |pq| pq.as_str().len());
        if target_len > self.max_uri_bytes {
            return Err(ProxyError::UriTooLong);
        }
        let host_header = checked_host(request)?;
        let absolute_form = request.version() < Version::HTTP_2 && request.uri().scheme().is_some();
        // The host as text, only where it is read: by routes that name hosts, and to check an
        // absolute-form target's (a check of every byte of the field).
        let host = (self.routes.by_host() || absolute_form)
            .then(|| {
                request
                    .uri()
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| host_header.and_then(|h| h.to_str().ok()))
            })
            .flatten();
        if absolute_form && !host.is_some_and(|h| self.routes.names_host(h)) {
            return Err(ProxyError::ForeignHost);
        }
        let judged = path::judge(request.uri().path()).map_err(ProxyError::BadPath)?;
        let route = self
            .routes
            .find(host, &judged.path)
            .ok_or(ProxyError::NoRoute)?;
        if judged.encoded_slash && !route.allow_encoded_slashes {
            return Err(ProxyError::BadPath(PathError::EncodedSlash));
        }
        if let Some(before) = &judged.before_dots {
            let named = self.routes.find(host, before);
            if !named.is_some_and(|r| std::ptr::eq(r, route)) {
                return Err(ProxyError::BadPath(PathError::EscapesRoute));
            }
        }
        route
            .access
            .check(
                client.0.address.ip(),
                client.0.conn.client_cert(),
                request.method(),
                route.rest_of(&judged.path),
                request.headers(),
            )
            .map_err(ProxyError::Denied)?;
        let forwarded_host = if self
            .forwarding_headers
            .contains(ForwardingHeaders::X_FORWARDED_HOST)
        {
            host_header
                .cloned()
                .or_else(|| client.authority_value(request.uri().authority()?))
        } else {
            None
        };
        Ok(Picked {
            route,
            judged_path: match judged.path {
                Cow::Owned(path) => Some(path),
                Cow::Borrowed(_) => None,
            },
            forwarded_host,
        })
    }

    /// Decides, without waiting, whether a request body is streamed or kept (within
    /// `server.replay_memory`) so that the request can be replayed after a token rejection.
    /// `socket` is told when the body is first waited for.
    fn stream_or_budget<'a>(
        &'a self,
        route: &Route,
        body: Incoming,
        replayable: bool,
        socket: &Arc<SocketSignals>,
    ) -> Kept<'a> {
        let budget = (route.replay && replayable)
            .then(|| self.replay_budget(&body))
            .flatten();
        match budget {
            // Nothing to keep: a replay needs only the head.
            Some(None) => Kept::Decided(RequestBody::EMPTY, true),
            Some(Some(budget)) => Kept::Keep(body, budget),
            None if body.is_end_stream() => Kept::Decided(RequestBody::EMPTY, false),
            None => Kept::Decided(
                RequestBody::Timed(Box::new(TimedBody::new(
                    body,
                    self.body_pace,
                    Some(socket.clone()),
                ))),
                false,
            ),
        }
    }

    /// Reads a small body into memory, its pauses bounded, and keeps it for a replay.
    async fn keep<'a>(
        &'a self,
        parts: &http::request::Parts,
        forwarded_host: Option<HeaderValue>,
        body: Incoming,
        budget: SemaphorePermit<'a>,
        socket: Arc<SocketSignals>,
    ) -> Result<(RequestBody, Option<Replay<'a>>), ProxyError> {
        let kept = Limited::new(
            TimedBody::new(body, self.body_pace, Some(socket)),
            self.replay_body_limit as usize,
        )
        .collect()
        .await
        .map_err(|error| match body_timeout_in(&*error) {
            Some(slow) => ProxyError::BodyTimeout(slow),
            None => ProxyError::ClientBody(error),
        })?
        .to_bytes();
        let replay = Replay::with_body(parts, forwarded_host, kept.clone(), budget);
        Ok((RequestBody::Full(kept), Some(replay)))
    }

    /// Takes the share of `server.replay_memory` a request body needs to be kept: `None`
    /// if it is too large, of unknown length, or the budget is spent; `Some(None)` for an
    /// empty body, which needs no share.
    fn replay_budget(&self, body: &Incoming) -> Option<Option<SemaphorePermit<'_>>> {
        if body.is_end_stream() {
            return Some(None);
        }
        let size = body
            .size_hint()
            .upper()
            .filter(|n| *n <= self.replay_body_limit)?;
        let permit = self.replay_memory.try_acquire_many(size as u32).ok();
        if permit.is_none() {
            replay_memory_spent(size);
        }
        permit.map(Some)
    }

    /// Sends a request upstream (on a new connection, if `new_connection`) within the
    /// upstream's budget and waits, bounded, for the response head.
    #[allow(clippy::manual_async_fn)] // the request once, not twice: see `handle`
    fn forward<'a>(
        &'a self,
        route: &'a Route,
        request: Request<RequestBody>,
        client: &'a ProxyService,
        new_connection: bool,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + 'a {
        async move {
            let budget = &route.budget;
            let Some(slot) = budget.request_slot(self.upstream_timeout).await else {
                return Err(ProxyError::UpstreamBusy {
                    max: budget.max(),
                    waited: self.upstream_timeout,
                });
            };
            let sending = tokio::time::Instant::now();
            let deadline = sending + self.upstream_timeout;
            let to_upstream = route.pool.send(request, new_connection, sending);
            let conn = &client.0.conn;
            let mut exchange = Exchange::new(to_upstream, slot, conn.clone());
            let answered = conn.timers.within(deadline, &mut exchange).await;
            let Ok(answered) = answered else {
                exchange.give_up();
                return Err(ProxyError::UpstreamTimeout(self.upstream_timeout));
            };
            if answered.is_ok() {
                route.metrics.upstream_answered(sending.elapsed());
            }
            answered.map_err(|e| match body_timeout_in(&e) {
                Some(slow) => ProxyError::BodyTimeout(slow),
                None => match e {
                    SendError::Connect(e) => ProxyError::UpstreamConnect(e),
                    SendError::Exchange(e) => ProxyError::Upstream(e),
                    SendError::Dropped(e) => ProxyError::UpstreamDropped(e),
                },
            })
        }
    }

    /// After the upstream closed a reused connection under a request it was sent: sends it
    /// once more, on a new connection, if its method is idempotent (RFC 9110 §9.2.2: it may
    /// be repeated after a failure before its answer) and it was kept; otherwise the failure
    /// stands.
    async fn resend(
        &self,
        route: &Route,
        sent: &HeaderValue,
        replay: Option<&Replay<'_>>,
        client: &ProxyService,
        error: hyper::Error,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let Some(request) = replay
            .filter(|r| r.is_idempotent())
            .and_then(|r| r.request(sent.clone(), &client.0.address, self.forwarding_headers))
        else {
            return Err(ProxyError::UpstreamDropped(error));
        };
        tracing::debug!(
            route = %route.name, error = %crate::error_chain(&error),
            "the upstream closed a reused connection under a request; sending it once more"
        );
        route.metrics.upstream_resent();
        self.forward(route, request, client, true).await
    }

    /// After an upstream refused the token `sent`: one shared refresh, then at most one
    /// replay with the new token; otherwise the upstream's answer, untouched.
    async fn after_rejection(
        &self,
        route: &Route,
        sent: &HeaderValue,
        original: Response<ProxyBody>,
        replay: Option<&Replay<'_>>,
        client: &ProxyService,
    ) -> Result<(Response<ProxyBody>, ReplayOutcome), ProxyError> {
        let account = &route.account;
        if account.reject(sent) == Rejection::Held {
            return Ok((original, ReplayOutcome::Held));
        }
        let Some(replay) = replay else {
            return Ok((original, ReplayOutcome::NotKept));
        };
        let fresh = match Box::pin(account.header_or_wait(self.token_wait)).await {
            Ok(fresh) if fresh != *sent => fresh,
            _ => return Ok((original, ReplayOutcome::NoToken)),
        };
        let again = replay.request(fresh.clone(), &client.0.address, self.forwarding_headers);
        let Some(request) = again else {
            return Ok((original, ReplayOutcome::NotKept));
        };
        if let ProxyBody::Upstream(body) = original.into_body() {
            body.discard();
        }
        tracing::debug!(route = %route.name, "replaying a refused request with a fresh token");
        match inspect(self.forward(route, request, client, false).await?).await? {
            Inspected::Pass(response) => Ok((response, ReplayOutcome::Ok)),
            Inspected::Rejected(response, code) => {
                // Never a second replay; the breaker counts a fresh token refused.
                account.stats().rejection(&code);
                account.reject(&fresh);
                Ok((response, ReplayOutcome::Rejected))
            }
        }
    }
}

/// The rest of a request whose answer did not pass as it came ([`Proxy::judge`],
/// [`Proxy::settle`]).
type Settling<'a> =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a>>;

/// An answer passed on: the proxy alone decides how its client connection carries on.
fn passed(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    remove_hop_by_hop(response.headers_mut());
    response
}

/// Logs a forwarded request (`debug`). This and the other events of a request's poll are
/// made in functions of their own: an event's fields take room in the stack frame of the
/// function that makes it, on every call (see [`crate::Apart`]).
#[inline(never)]
fn forwarded(method: &Method, route: &Route, status: http::StatusCode, started: Instant) {
    tracing::debug!(
        http.method = %method, route = %route.name, upstream = %route.upstream,
        status = status.as_u16(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "forwarded"
    );
}

/// Answers a request that failed with `error`, logged at the level of whose fault it is.
#[cold]
#[inline(never)]
fn failed(
    error: ProxyError,
    method: &Method,
    client: &ProxyService,
    record: &mut Record,
    started: Instant,
) -> Response<ProxyBody> {
    if let Some(kind) = error.upstream_error() {
        record.route().upstream_failed(kind);
    }
    let (status, code, fault) = error.classify();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let chain = crate::error_chain(&error);
    let peer = client.0.address.ip();
    match fault {
        Fault::Client => {
            tracing::debug!(http.method = %method, %peer, status = status.as_u16(), code, elapsed_ms, error = %chain, "refused")
        }
        Fault::Access => {
            tracing::info!(http.method = %method, %peer, status = status.as_u16(), code, error = %chain, "access refused")
        }
        Fault::Upstream | Fault::Identity => {
            tracing::warn!(http.method = %method, %peer, status = status.as_u16(), code, elapsed_ms, error = %chain, "failed")
        }
        Fault::Proxy => {
            tracing::error!(http.method = %method, %peer, status = status.as_u16(), code, elapsed_ms, error = %chain, "failed")
        }
    }
    error.to_response()
}

/// The route label of requests no route took.
pub const UNROUTED: &str = "(none)";

/// Returns the request's `Host` header, refusing what RFC 9112 §3.2 says a server must:
/// an HTTP/1.1 request without one, more than one, or one that is not a valid host.
fn checked_host<B>(request: &Request<B>) -> Result<Option<&HeaderValue>, ProxyError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() || host.is_some_and(|h| !is_valid_host(h.as_bytes())) {
        return Err(ProxyError::BadHost);
    }
    if host.is_none() && request.version() == Version::HTTP_11 {
        return Err(ProxyError::BadHost);
    }
    Ok(host)
}

/// Rewrites the request head for the upstream: target (the judged path, if judging changed
/// it), hop-by-hop and credential headers removed. The forwarding headers and the token are
/// set by the caller.
fn rewrite(
    parts: &mut http::request::Parts,
    route: &Route,
    judged_path: Option<&str>,
) -> Result<(), ProxyError> {
    let path_and_query = route
        .upstream_target(parts.uri.path_and_query(), judged_path)
        .map_err(|e| ProxyError::BadTarget(e.into()))?;
    // Origin-form; the pool gives an HTTP/2 request its scheme and authority.
    parts.uri = Uri::from(path_and_query);
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    match &route.host_header {
        Some(host) => headers.insert(header::HOST, host.clone()),
        None => headers.remove(header::HOST),
    };
    headers.remove(header::AUTHORIZATION);
    if let Some(marker) = route.access.marker() {
        headers.remove(marker);
    }
    // The upstream connection has its own version (ALPN or h2c).
    parts.version = Version::HTTP_11;
    Ok(())
}

/// One connection's view of the proxy, as hyper calls it.
#[derive(Clone)]
pub struct ProxyService(Arc<ConnView>);

/// What every request of a connection shares, made once per connection so that a request
/// clones one `Arc`.
struct ConnView {
    /// The listener's proxy of the configuration in use; each request takes the one in use
    /// when it begins and finishes on it, whatever a reload swaps in meanwhile.
    proxy: Arc<ArcSwap<Proxy>>,
    conn: Arc<ClientConn>,
    address: ClientAddress,
    /// The last `:authority` of an HTTP/2 request as a header value: clients name the same
    /// one on every stream, and a clone of it costs no allocation.
    authority: Mutex<Option<HeaderValue>>,
    /// Open client connections, this one counted until its last request is done.
    connections: Gauge,
}

impl Drop for ConnView {
    fn drop(&mut self) {
        self.connections.dec();
    }
}

impl ProxyService {
    /// Creates the service for the client connection `conn`, counted in `connections`.
    pub fn new(
        proxy: Arc<ArcSwap<Proxy>>,
        conn: Arc<ClientConn>,
        connections: &Gauge,
    ) -> ProxyService {
        let address = ClientAddress::new(conn.peer().ip(), &proxy.load().trusted_proxies);
        connections.inc();
        ProxyService(Arc::new(ConnView {
            proxy,
            conn,
            address,
            authority: Mutex::new(None),
            connections: connections.clone(),
        }))
    }

    /// Returns `authority` (an HTTP/2 request's, or an absolute target's) as a header value.
    fn authority_value(&self, authority: &http::uri::Authority) -> Option<HeaderValue> {
        let mut last = self.0.authority.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some(value) if value.as_bytes() == authority.as_str().as_bytes() => Some(value.clone()),
            _ => {
                let value = HeaderValue::from_str(authority.as_str()).ok()?;
                *last = Some(value.clone());
                Some(value)
            }
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<Metered>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        if !request.body().is_end_stream() {
            // Its client may hold the body back until the head is acknowledged.
            self.0.conn.signals.body_to_come();
        }
        let service = self.clone();
        // Held here once, and lent to the steps (`Proxy::handle`).
        let mut request = Some(request);
        crate::pin_in_place(move || async move {
            let proxy = service.0.proxy.load_full();
            let mut record = Record::begin(&proxy.unrouted, Instant::now());
            // Awaited in place: a future held in a local and then moved would be stored twice.
            let response = answer_or_500(proxy.handle(&mut request, &service, &mut record)).await;
            Ok(response.map(|body| Metered::new(body, record)))
        })
    }
}

/// Answers 500 instead of dropping the connection when handling a request panics (a bug of
/// the proxy; the connection and every other request carry on).
fn answer_or_500(
    handling: impl Future<Output = Response<ProxyBody>>,
) -> impl Future<Output = Response<ProxyBody>> {
    AssertUnwindSafe(handling)
        .catch_unwind()
        .map(|handled| match handled {
            Ok(response) => response,
            Err(_) => panicked(),
        })
}

/// The answer to a request whose handling panicked.
#[cold]
#[inline(never)]
fn panicked() -> Response<ProxyBody> {
    tracing::error!("handling a request panicked; answering 500");
    ProxyError::Internal.to_response()
}

/// Says that a body that could have been kept for a replay streams instead.
#[cold]
#[inline(never)]
fn replay_memory_spent(bytes: u64) {
    tracing::debug!(
        bytes,
        "server.replay_memory is spent: the request streams and cannot be replayed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_while_handling_becomes_a_500_with_a_json_body() {
        let response = answer_or_500(async { panic!("a bug") }).await;
        assert_eq!(response.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "internal_error");
    }
}
