//! `probe URL`: one GET, success for a 2xx answer within the timeout. Containers built
//! from a minimal base have no curl or wget for their `HEALTHCHECK`.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0} is not an http:// URL")]
    Url(String),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the request failed: {0}")]
    Request(String),
    #[error("answered {0}")]
    Status(http::StatusCode),
}

/// Sends one GET to `url` (plain HTTP); returns its status if it is a success.
pub async fn run(url: &str, timeout: Duration) -> Result<http::StatusCode, ProbeError> {
    let uri: http::Uri = url.parse().map_err(|_| ProbeError::Url(url.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(ProbeError::Url(url.to_owned()));
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let answer = tokio::time::timeout(timeout, client.get(uri))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
        .map_err(|e| ProbeError::Request(crate::error_chain(&e)))?;
    let status = answer.status();
    if status.is_success() {
        Ok(status)
    } else {
        Err(ProbeError::Status(status))
    }
}
