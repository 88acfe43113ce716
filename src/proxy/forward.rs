//! The pooled, keep-alive client that carries requests to upstreams (HTTP/1.1 and, where
//! the upstream offers it by ALPN, HTTP/2).

use super::body::ProxyBody;
use super::upstream::{BudgetedConnector, Budgets};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;

/// The client type of the forwarding path.
pub type UpstreamClient = Client<BudgetedConnector<HttpsConnector<HttpConnector>>, ProxyBody>;

/// How long an idle upstream connection is kept for reuse.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The clients of the forwarding path: one that agrees the version with each upstream
/// (HTTP/1.1, or HTTP/2 by ALPN over TLS), and one for routes that speak h2c. The workers
/// share them: an upstream's connection budget counts one pool, so that an idle connection
/// of one worker never keeps another from connecting.
pub struct UpstreamClients {
    negotiated: UpstreamClient,
    h2c: UpstreamClient,
}

impl UpstreamClients {
    /// Returns the client for `h2c` routes or for the others.
    pub fn get(&self, h2c: bool) -> &UpstreamClient {
        if h2c {
            &self.h2c
        } else {
            &self.negotiated
        }
    }
}

impl std::fmt::Debug for UpstreamClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClients").finish_non_exhaustive()
    }
}

/// Builds the upstream clients; `tls` verifies `https://` upstreams (as `server_name`, if
/// given, instead of the host), `budgets` bounds the connections to each (all clients
/// together).
pub fn upstream_clients(
    tls: rustls::ClientConfig,
    server_name: Option<&str>,
    connect_timeout: Duration,
    budgets: Arc<Budgets>,
) -> UpstreamClients {
    let connector = connector(tls, server_name, connect_timeout, budgets);
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
    server_name: Option<&str>,
    connect_timeout: Duration,
    budgets: Arc<Budgets>,
) -> BudgetedConnector<HttpsConnector<HttpConnector>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match server_name.and_then(|n| ServerName::try_from(n.to_owned()).ok()) {
        Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
        None => builder,
    };
    let https = builder.enable_all_versions().wrap_connector(http);
    BudgetedConnector::new(https, budgets)
}
