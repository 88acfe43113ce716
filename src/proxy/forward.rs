//! The pooled, keep-alive client that carries requests to upstreams (HTTP/1.1 and, where
//! the upstream offers it by ALPN, HTTP/2).

use super::body::ProxyBody;
use super::upstream::{BudgetedConnector, Budgets};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::time::Duration;

/// The client type of the forwarding path.
pub type UpstreamClient = Client<BudgetedConnector<HttpsConnector<HttpConnector>>, ProxyBody>;

/// How long an idle upstream connection is kept for reuse.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Builds the upstream client; `tls` verifies `https://` upstreams, `budgets` bounds the
/// connections to each.
pub fn upstream_client(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    budgets: Arc<Budgets>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(BudgetedConnector::new(https, budgets))
}
