//! The hyper service of the proxy: one struct, the request phases as plain functions.

use super::error::{Fault, ProxyError};
use super::forward::UpstreamClient;
use super::headers::{forwarded_for, remove_hop_by_hop};
use super::inspect::{inspect, Inspected};
use super::route::{Route, RouteTable};
use super::upgrade;
use crate::identity::Rejection;
use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::upgrade::OnUpgrade;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The body of every request and response the proxy passes on: streamed as received, or a
/// small body of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

const X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: header::HeaderName = header::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: header::HeaderName = header::HeaderName::from_static("x-forwarded-host");

/// The state shared by every connection: routes, the upstream client and the limits.
pub struct Proxy {
    routes: RouteTable,
    client: UpstreamClient,
    upstream_timeout: Duration,
    token_wait: Duration,
    replay_body_limit: u64,
}

/// What is kept of a request so it can be sent once more with a fresh token.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Proxy {
    /// Creates the proxy from its routes and upstream client.
    pub fn new(
        routes: RouteTable,
        client: UpstreamClient,
        upstream_timeout: Duration,
        token_wait: Duration,
        replay_body_limit: u64,
    ) -> Proxy {
        Proxy {
            routes,
            client,
            upstream_timeout,
            token_wait,
            replay_body_limit,
        }
    }

    /// Returns the route table.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Serves one request: forwards it, or answers with the failure's status and a short body.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = request.method().clone();
        match self.handle_inner(request, peer).await {
            Ok((response, route)) => {
                tracing::debug!(
                    http.method = %method, route = %route.name, upstream = %route.upstream,
                    status = response.status().as_u16(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "forwarded"
                );
                response
            }
            Err(error) => {
                let (status, code, fault) = error.classify();
                let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                let chain = crate::identity::error_chain(&error);
                match fault {
                    Fault::Client => {
                        tracing::debug!(http.method = %method, status = status.as_u16(), code, elapsed_ms, error = %chain, "refused")
                    }
                    Fault::Upstream | Fault::Identity => {
                        tracing::warn!(http.method = %method, status = status.as_u16(), code, elapsed_ms, error = %chain, "failed")
                    }
                    Fault::Proxy => {
                        tracing::error!(http.method = %method, status = status.as_u16(), code, elapsed_ms, error = %chain, "failed")
                    }
                }
                error.to_response()
            }
        }
    }

    async fn handle_inner(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<(Response<ProxyBody>, &Route), ProxyError> {
        // Request filter.
        if request.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        let host = request_host(&request);
        let absolute_form = request.version() < Version::HTTP_2 && request.uri().scheme().is_some();
        if absolute_form && !host.is_some_and(|h| self.routes.names_host(h)) {
            return Err(ProxyError::ForeignHost);
        }

        // Pick upstream.
        let route = self
            .routes
            .find(host, request.uri().path())
            .ok_or(ProxyError::NoRoute)?;

        // Token: the ready-made header, or a short wait while one is being fetched.
        let sent = match route.account.usable_header() {
            Some(value) => value,
            None => route
                .account
                .header_or_wait(self.token_wait)
                .await
                .map_err(|cause| ProxyError::TokenUnavailable {
                    account: route.account.name().to_owned(),
                    cause,
                })?,
        };

        // Rewrite.
        let (mut parts, body) = request.into_parts();
        let upgrade = upgrade::requested(&parts.headers);
        rewrite(&mut parts, route, peer)?;
        let client_upgrade = match upgrade {
            Some(protocol) => {
                upgrade::keep_upgrade_headers(&mut parts.headers, protocol);
                parts.extensions.remove::<OnUpgrade>()
            }
            None => None,
        };
        // A small body is kept, so the request can be replayed after a token rejection.
        let (body, replay) = if route.replay && client_upgrade.is_none() && self.fits(&body) {
            let kept = Limited::new(body, self.replay_body_limit as usize)
                .collect()
                .await
                .map_err(ProxyError::ClientBody)?
                .to_bytes();
            let replay = Replay {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                body: kept.clone(),
            };
            (Either::Right(Full::new(kept)), Some(replay))
        } else {
            (Either::Left(body), None)
        };
        parts.headers.insert(header::AUTHORIZATION, sent.clone());

        // Forward.
        let response = self.forward(Request::from_parts(parts, body)).await?;
        if let Some(client) = client_upgrade {
            let response = upgrade::tunnel(response, client, route.account.clone(), sent);
            return Ok((response, route));
        }

        // Response filter.
        let response = match inspect(response).await? {
            Inspected::Pass(response) => response,
            Inspected::Rejected(original) => {
                self.after_rejection(route, sent, original, replay).await?
            }
        };
        Ok((response, route))
    }

    /// Tells whether a request body is small enough to keep for a replay.
    fn fits(&self, body: &Incoming) -> bool {
        body.is_end_stream()
            || body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= self.replay_body_limit)
    }

    /// Sends a request upstream and waits, bounded, for the response head.
    async fn forward(&self, request: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        tokio::time::timeout(self.upstream_timeout, self.client.request(request))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(self.upstream_timeout))?
            .map_err(|e| {
                if e.is_connect() {
                    ProxyError::UpstreamConnect(e)
                } else {
                    ProxyError::Upstream(e)
                }
            })
    }

    /// After an upstream refused the token `sent`: one shared refresh, then at most one
    /// replay with the new token; otherwise the upstream's answer, untouched.
    async fn after_rejection(
        &self,
        route: &Route,
        sent: HeaderValue,
        original: Response<ProxyBody>,
        replay: Option<Replay>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let account = &route.account;
        if account.reject(&sent) == Rejection::Held {
            return Ok(original);
        }
        let Some(replay) = replay else {
            return Ok(original);
        };
        let fresh = match account.header_or_wait(self.token_wait).await {
            Ok(fresh) if fresh != sent => fresh,
            _ => return Ok(original),
        };
        drop(original);
        let mut request = Request::new(Either::Right(Full::new(replay.body)));
        *request.method_mut() = replay.method;
        *request.uri_mut() = replay.uri;
        *request.headers_mut() = replay.headers;
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, fresh.clone());
        tracing::debug!(route = %route.name, "replaying a refused request with a fresh token");
        match inspect(self.forward(request).await?).await? {
            Inspected::Pass(response) => Ok(response),
            Inspected::Rejected(response) => {
                // Never a second replay; the breaker counts a fresh token refused.
                account.reject(&fresh);
                Ok(response)
            }
        }
    }
}

/// Rewrites the request head for the upstream: target, hop-by-hop and credential headers
/// removed, `X-Forwarded-*` set. The token is inserted by the caller.
fn rewrite(
    parts: &mut http::request::Parts,
    route: &Route,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let path_and_query = route
        .upstream_target(parts.uri.path_and_query())
        .map_err(|e| ProxyError::BadTarget(e.into()))?;
    parts.uri = Uri::builder()
        .scheme(route.upstream.scheme.clone())
        .authority(route.upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(ProxyError::BadTarget)?;
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    let xff = forwarded_for(headers.get(X_FORWARDED_FOR), peer.ip());
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    // The upstream connection picks its own version (ALPN); hyper sets Host from the URI.
    parts.version = Version::HTTP_11;
    Ok(())
}

/// The host a request is for: the URI's authority (absolute form, HTTP/2) or `Host`.
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(header::HOST)?.to_str().ok())
}

/// One connection's view of the proxy, as hyper calls it.
#[derive(Clone)]
pub struct ProxyService {
    proxy: Arc<Proxy>,
    peer: SocketAddr,
}

impl ProxyService {
    /// Creates the service for a connection from `peer`.
    pub fn new(proxy: Arc<Proxy>, peer: SocketAddr) -> ProxyService {
        ProxyService { proxy, peer }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let proxy = self.proxy.clone();
        let peer = self.peer;
        Box::pin(async move {
            Ok(answer_or_500(async move { proxy.handle(request, peer).await }).await)
        })
    }
}

/// Answers 500 instead of dropping the connection when handling a request panics (a bug of
/// the proxy; the connection and every other request carry on).
async fn answer_or_500(handling: impl Future<Output = Response<ProxyBody>>) -> Response<ProxyBody> {
    match AssertUnwindSafe(handling).catch_unwind().await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!("handling a request panicked; answering 500");
            ProxyError::Internal.to_response()
        }
    }
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
