//! Local stand-ins that behave like Mosaic: an identity service and a Mosaic-like upstream.
//! The demo, the tests and load-test setups use them; nothing here runs in a proxy.

pub mod accounts;
pub mod body;
pub mod identity;
pub mod keys;
pub mod upstream;

pub use identity::{Fault, IdentityStub, StubAccount, StubHandle, StubSettings};
pub use keys::SigningKey;
pub use upstream::{MosaicUpstream, UpstreamHandle};

/// The body type the stand-ins answer with.
pub type StubBody = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

pub use crate::BoxError;

/// Wraps a complete body.
pub fn full(bytes: impl Into<bytes::Bytes>) -> StubBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Builds a JSON response.
pub fn json(status: http::StatusCode, body: impl Into<bytes::Bytes>) -> http::Response<StubBody> {
    use http_body_util::BodyExt;
    crate::admin::json(status, body).map(|body| body.map_err(|never| match never {}).boxed())
}

/// Builds a Mosaic-shaped GraphQL error reply body (`data: null`), as the services send it.
pub fn error_body(
    code: &crate::mosaic::ErrorCode,
    message: &str,
    operation: Option<&str>,
    path: &str,
) -> String {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    serde_json::json!({
        "errors": [{
            "message": message,
            "locations": [{"line": 1, "column": 1}],
            "path": [path],
            "extensions": {
                "timestamp": now,
                "operationName": operation,
                "exception": {"code": code.as_str()}
            },
            "timestamp": now,
            "code": code.as_str(),
            "details": {}
        }],
        "data": null
    })
    .to_string()
}

/// Connections a stand-in serves at once.
const STAND_IN_MAX_CONNECTIONS: usize = 4096;

/// How long a stand-in keeps an idle connection, as a Node service does by default
/// (`server.keepAliveTimeout`); it says so in each answer (`Keep-Alive: timeout=5`).
pub const NODE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// Counts a stand-in's connections: opened so far, and open now.
#[derive(Debug, Default)]
pub struct Connections {
    opened: std::sync::atomic::AtomicU64,
    open: std::sync::atomic::AtomicU64,
}

impl Connections {
    /// Counts the connections accepted so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counts the connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One open connection of a stand-in, counted until it is dropped with its service.
struct Open(std::sync::Arc<Connections>);

impl Open {
    fn new(connections: &std::sync::Arc<Connections>) -> Open {
        use std::sync::atomic::Ordering::SeqCst;
        connections.opened.fetch_add(1, SeqCst);
        connections.open.fetch_add(1, SeqCst);
        Open(connections.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Serves a stand-in: each request is answered by `answer` with the shared `state`; its
/// connections are counted in `connections`, and closed once idle for `keep_alive`, as
/// each answer announces.
async fn serve_stand_in<S, F, Fut>(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<S>,
    answer: F,
    connections: std::sync::Arc<Connections>,
    keep_alive: std::time::Duration,
    shutdown: crate::shutdown::Shutdown,
) where
    S: Send + Sync + 'static,
    F: Fn(std::sync::Arc<S>, http::Request<hyper::body::Incoming>) -> Fut
        + Copy
        + Send
        + Sync
        + Unpin
        + 'static,
    Fut: std::future::Future<Output = Result<http::Response<StubBody>, BoxError>> + Send + 'static,
{
    let limits = crate::config::ConnectionLimits {
        max_connections: Some(STAND_IN_MAX_CONNECTIONS),
        idle_timeout: keep_alive,
        ..Default::default()
    };
    let announced = http::HeaderValue::from_str(&format!("timeout={}", keep_alive.as_secs()))
        .expect("a number is a header value");
    crate::server::serve(
        listener,
        move |_| {
            let state = state.clone();
            let open = Open::new(&connections);
            let announced = announced.clone();
            hyper::service::service_fn(move |request| {
                let _counted = &open;
                let answered = answer(state.clone(), request);
                let announced = announced.clone();
                async move {
                    let mut response = answered.await?;
                    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                        response
                            .headers_mut()
                            .insert(crate::proxy::headers::KEEP_ALIVE, announced);
                    }
                    Ok::<_, BoxError>(response)
                }
            })
        },
        limits,
        None,
        None,
        shutdown,
        std::time::Duration::from_secs(1),
    )
    .await;
}
