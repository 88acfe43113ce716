//! The admin listener: probes (`/livez`, `/readyz` and their older names), Prometheus
//! metrics (`/metrics`), the status page (`/`, its data at `/status.json`) and `POST /reload`.

mod status;

use crate::app::{Live, ReloadError};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The status page: plain HTML and a little script, no external assets.
const PAGE: &str = include_str!("page.html");

/// Answers one admin request.
pub async fn respond(request: &Request<Incoming>, live: &Live) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let method = request.method();
    if path == "/reload" {
        if method != Method::POST {
            return with_allow(
                json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    r#"{"error":"method_not_allowed","message":"POST /reload"}"#,
                ),
                "POST",
            );
        }
        return reload(live).await;
    }
    if method != Method::GET && method != Method::HEAD {
        return with_allow(
            json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"method_not_allowed"}"#,
            ),
            "GET, HEAD",
        );
    }
    match path {
        "/livez" | "/health" | "/healthz" | "/live" => json(StatusCode::OK, r#"{"status":"ok"}"#),
        "/readyz" | "/ready" => {
            let (ready, body) = status::readiness(live);
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, body.to_string())
        }
        "/metrics" => answer(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            live.metrics().render(),
        ),
        "/status.json" => json(StatusCode::OK, status::status(live).to_string()),
        "/" => answer(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#),
    }
}

async fn reload(live: &Live) -> Response<Full<Bytes>> {
    match live.reload().await {
        Ok(report) => {
            let body = serde_json::json!({"status": "reloaded", "report": report});
            json(StatusCode::OK, body.to_string())
        }
        Err(ReloadError::Config(errors)) => {
            let list: Vec<serde_json::Value> = errors
                .0
                .iter()
                .map(|e| serde_json::json!({"key": e.key, "problem": e.problem, "fix": e.fix}))
                .collect();
            let body = serde_json::json!({
                "status": "refused",
                "message": errors.to_string(),
                "errors": list,
            });
            json(StatusCode::UNPROCESSABLE_ENTITY, body.to_string())
        }
        Err(error) => {
            let body = serde_json::json!({
                "status": "refused",
                "message": crate::error_chain(&error),
            });
            json(StatusCode::UNPROCESSABLE_ENTITY, body.to_string())
        }
    }
}

/// Builds a JSON answer (the admin listener's, and the stand-ins').
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    answer(status, "application/json", body)
}

fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn with_allow(mut response: Response<Full<Bytes>>, allow: &'static str) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// The admin service of one connection.
#[derive(Clone)]
pub struct AdminService {
    live: Arc<Live>,
}

impl AdminService {
    /// Creates the service over the configuration in use.
    pub fn new(live: Arc<Live>) -> AdminService {
        AdminService { live }
    }
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let live = self.live.clone();
        Box::pin(async move { Ok(respond(&request, &live).await) })
    }
}
