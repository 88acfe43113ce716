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

/// The clients of the forwarding path: one that agrees the version with each upstream
/// (HTTP/1.1, or HTTP/2 by ALPN over TLS), and one for routes that speak h2c.
pub struct UpstreamClients {
    pub negotiated: UpstreamClient,
    pub h2c: UpstreamClient,
}

/// Builds the upstream clients; `tls` verifies `https://` upstreams, `budgets` bounds the
/// connections to each (both clients together).
pub fn upstream_clients(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    budgets: Arc<Budgets>,
) -> UpstreamClients {
    let connector = connector(tls, connect_timeout, budgets);
    UpstreamClients {
        negotiated: builder().build(connector.clone()),
        h2c: builder().http2_only(true).build(connector),
    }
}

fn builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    builder
}

fn connector(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    budgets: Arc<Budgets>,
) -> BudgetedConnector<HttpsConnector<HttpConnector>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    BudgetedConnector::new(https, budgets)
}
