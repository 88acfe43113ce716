//! Every way a proxied request can fail, and the one table that maps each to a status.

use super::access::Denied;
use super::body::{BodyTimeout, ProxyBody};
use super::path::PathError;
use crate::identity::TokenUnavailable;
use crate::metrics::UpstreamError;
use crate::BoxError;
use http::{header, HeaderValue, Response, StatusCode};
use std::time::Duration;

/// A failed request, classified by who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("CONNECT is not served: this proxy is not an open proxy")]
    Connect,
    #[error(
        "absolute-form request for a host that no route names: this proxy is not an open proxy"
    )]
    ForeignHost,
    #[error("TRACE is not served: it would echo the injected token back to the client")]
    Trace,
    #[error("this connection cancelled too many forwarded requests; open a new one")]
    Calmed,
    #[error("the request target is longer than server.max_uri_bytes")]
    UriTooLong,
    #[error("an HTTP/1.1 request needs exactly one valid Host header")]
    BadHost,
    #[error(transparent)]
    BadPath(PathError),
    #[error(transparent)]
    Denied(Denied),
    #[error("the request target cannot be forwarded")]
    BadTarget(#[source] http::Error),
    #[error("the request body could not be read")]
    ClientBody(#[source] BoxError),
    #[error(transparent)]
    BodyTimeout(BodyTimeout),
    #[error("no access token is available for account {account}")]
    TokenUnavailable {
        account: String,
        cause: TokenUnavailable,
    },
    #[error("cannot connect to the upstream")]
    UpstreamConnect(#[source] BoxError),
    #[error("the upstream did not answer within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    #[error("the upstream connection failed")]
    Upstream(#[source] hyper::Error),
    #[error("the upstream closed the connection before answering")]
    UpstreamDropped(#[source] hyper::Error),
    #[error("the upstream's answer broke off")]
    UpstreamBody(#[source] BoxError),
    #[error("the upstream switched protocols for a request that asked for no upgrade")]
    UpstreamSwitched,
    #[error("the upstream's {max} connections stayed busy for {}", humantime::format_duration(*.waited))]
    UpstreamBusy { max: usize, waited: Duration },
    #[error("an internal error of the proxy")]
    Internal,
}

/// `Retry-After` when an upstream's connections are all busy: soon, they turn over quickly.
const UPSTREAM_BUSY_RETRY_AFTER_SECS: u64 = 1;

/// Who caused a failure: decides the log level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    /// A client refused by a route's access rules: worth an info line.
    Access,
    Upstream,
    Identity,
    /// A bug of the proxy.
    Proxy,
}

impl ProxyError {
    /// The one status table: each failure's status, stable code and who is at fault.
    pub fn classify(&self) -> (StatusCode, &'static str, Fault) {
        match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no_route", Fault::Client),
            ProxyError::Connect => (
                StatusCode::METHOD_NOT_ALLOWED,
                "connect_refused",
                Fault::Client,
            ),
            ProxyError::ForeignHost => (StatusCode::FORBIDDEN, "not_an_open_proxy", Fault::Client),
            ProxyError::Trace => (
                StatusCode::METHOD_NOT_ALLOWED,
                "trace_refused",
                Fault::Client,
            ),
            ProxyError::Calmed => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_cancellations",
                Fault::Client,
            ),
            ProxyError::UriTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long", Fault::Client),
            ProxyError::BadHost => (StatusCode::BAD_REQUEST, "bad_host", Fault::Client),
            ProxyError::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path", Fault::Client),
            ProxyError::Denied(_) => (StatusCode::FORBIDDEN, "access_denied", Fault::Access),
            ProxyError::BadTarget(_) => (StatusCode::BAD_REQUEST, "bad_target", Fault::Client),
            ProxyError::ClientBody(_) => (StatusCode::BAD_REQUEST, "bad_body", Fault::Client),
            ProxyError::BodyTimeout(_) => {
                (StatusCode::REQUEST_TIMEOUT, "body_timeout", Fault::Client)
            }
            ProxyError::TokenUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "token_unavailable",
                Fault::Identity,
            ),
            ProxyError::UpstreamConnect(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                Fault::Upstream,
            ),
            ProxyError::UpstreamBusy { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_busy",
                Fault::Upstream,
            ),
            ProxyError::UpstreamTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                Fault::Upstream,
            ),
            ProxyError::Upstream(_)
            | ProxyError::UpstreamDropped(_)
            | ProxyError::UpstreamBody(_)
            | ProxyError::UpstreamSwitched => {
                (StatusCode::BAD_GATEWAY, "upstream_failed", Fault::Upstream)
            }
            ProxyError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                Fault::Proxy,
            ),
        }
    }

    /// Tells what kind of upstream failure this is, for the metrics; `None` for the others.
    pub fn upstream_error(&self) -> Option<UpstreamError> {
        match self {
            ProxyError::UpstreamConnect(e) if is_tls(&**e) => Some(UpstreamError::Tls),
            ProxyError::Upstream(e) if is_tls(e) => Some(UpstreamError::Tls),
            ProxyError::UpstreamConnect(_) => Some(UpstreamError::Connect),
            ProxyError::UpstreamTimeout(_) => Some(UpstreamError::Timeout),
            ProxyError::Upstream(_)
            | ProxyError::UpstreamDropped(_)
            | ProxyError::UpstreamBody(_)
            | ProxyError::UpstreamSwitched => Some(UpstreamError::Broken),
            _ => None,
        }
    }

    /// Builds the short JSON answer; it names the failure and never internals.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let (status, code, _) = self.classify();
        let mut body = serde_json::json!({"error": code, "message": self.to_string()});
        let mut retry_after = None;
        if let ProxyError::TokenUnavailable { cause, .. } = self {
            if let Some(failure) = &cause.failure {
                body["reason"] = failure.to_string().into();
            }
            retry_after = Some(cause.retry_after_secs);
        }
        if let ProxyError::UpstreamBusy { .. } = self {
            retry_after = Some(UPSTREAM_BUSY_RETRY_AFTER_SECS);
        }
        let mut response = Response::new(ProxyBody::full(body.to_string()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Tells whether a TLS failure lies anywhere in the error's chain.
fn is_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<rustls::Error>() {
            return true;
        }
        // An io::Error's source() skips the error it wraps; rustls's sits inside such ones.
        cause = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}
