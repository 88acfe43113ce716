//! The hyper service of the proxy: one struct, the request phases as plain functions.

use super::error::{Fault, ProxyError};
use super::forward::UpstreamClient;
use super::headers::{forwarded_for, remove_hop_by_hop};
use super::route::RouteTable;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The body of every request and response the proxy passes on: streamed as received, or a
/// small body of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

const X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: header::HeaderName = header::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: header::HeaderName = header::HeaderName::from_static("x-forwarded-host");

/// The state shared by every connection: routes, the upstream client and the time limits.
pub struct Proxy {
    routes: RouteTable,
    client: UpstreamClient,
    upstream_timeout: Duration,
    token_wait: Duration,
}

impl Proxy {
    /// Creates the proxy from its routes and upstream client.
    pub fn new(
        routes: RouteTable,
        client: UpstreamClient,
        upstream_timeout: Duration,
        token_wait: Duration,
    ) -> Proxy {
        Proxy {
            routes,
            client,
            upstream_timeout,
            token_wait,
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
        let path = request.uri().path().to_owned();
        match self.handle_inner(request, peer).await {
            Ok((response, route)) => {
                tracing::debug!(
                    http.method = %method, path, route, status = response.status().as_u16(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "forwarded"
                );
                response
            }
            Err(error) => {
                let (status, code, fault) = error.classify();
                let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                let chain = crate::identity::account::error_chain(&error);
                match fault {
                    Fault::Client => {
                        tracing::debug!(http.method = %method, path, status = status.as_u16(), code, elapsed_ms, error = %chain, "refused")
                    }
                    Fault::Upstream | Fault::Identity => {
                        tracing::warn!(http.method = %method, path, status = status.as_u16(), code, elapsed_ms, error = %chain, "failed")
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
    ) -> Result<(Response<ProxyBody>, &str), ProxyError> {
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
        let authorization = match route.account.usable_header() {
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
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let path_and_query = route.upstream_path_and_query(parts.uri.path(), parts.uri.query());
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
        headers.insert(header::AUTHORIZATION, authorization);
        // The upstream connection picks its own version (ALPN); hyper sets Host from the URI.
        parts.version = Version::HTTP_11;
        let upstream_request = Request::from_parts(parts, Either::Left(body));

        // Forward.
        let response =
            tokio::time::timeout(self.upstream_timeout, self.client.request(upstream_request))
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(self.upstream_timeout))?
                .map_err(|e| {
                    if e.is_connect() {
                        ProxyError::UpstreamConnect(e)
                    } else {
                        ProxyError::Upstream(e)
                    }
                })?;

        // Response filter.
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Ok((Response::from_parts(parts, Either::Left(body)), &route.name))
    }
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
        Box::pin(async move { Ok(proxy.handle(request, peer).await) })
    }
}
