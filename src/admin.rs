//! The admin listener: liveness at `/health`, readiness at `/ready` (503 until every account
//! holds a usable token).

use crate::identity::Account;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;

/// Answers one admin request.
pub fn respond(request: &Request<Incoming>, accounts: &[Arc<Account>]) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method_not_allowed"}"#,
        );
    }
    match request.uri().path() {
        "/health" | "/healthz" | "/live" => json(StatusCode::OK, r#"{"status":"ok"}"#),
        "/ready" | "/readyz" => readiness(accounts),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
    }
}

fn readiness(accounts: &[Arc<Account>]) -> Response<Full<Bytes>> {
    let waiting: Vec<serde_json::Value> = accounts
        .iter()
        .filter(|a| !a.is_ready())
        .map(|a| {
            let reason = a.unavailable().failure.map(|f| f.to_string());
            serde_json::json!({"account": a.name(), "reason": reason})
        })
        .collect();
    if waiting.is_empty() {
        json(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        let body = serde_json::json!({"status": "not_ready", "waiting": waiting});
        json(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
    }
}

/// Builds a JSON answer (the admin listener's, and the stand-ins').
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The admin service of one connection.
#[derive(Clone)]
pub struct AdminService {
    accounts: Arc<[Arc<Account>]>,
}

impl AdminService {
    /// Creates the service over `accounts`.
    pub fn new(accounts: Arc<[Arc<Account>]>) -> AdminService {
        AdminService { accounts }
    }
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        std::future::ready(Ok(respond(&request, &self.accounts)))
    }
}
