//! Local stand-ins that behave like Mosaic: an identity service and a Mosaic-like upstream.
//! The demo, the tests and load-test setups use them; nothing here runs in a proxy.

pub mod body;
pub mod identity;
pub mod keys;
pub mod upstream;

pub use identity::{Fault, IdentityStub, StubAccount, StubHandle, StubSettings};
pub use keys::SigningKey;
pub use upstream::{MosaicUpstream, UpstreamHandle};

/// The body type the stand-ins answer with.
pub type StubBody = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

/// A boxed error of a stand-in's body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps a complete body.
pub fn full(bytes: impl Into<bytes::Bytes>) -> StubBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Builds a JSON response.
pub fn json(status: http::StatusCode, body: impl Into<bytes::Bytes>) -> http::Response<StubBody> {
    let mut response = http::Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Connections a stand-in serves at once.
const STAND_IN_MAX_CONNECTIONS: usize = 4096;

/// Serves a stand-in: each request is answered by `answer` with the shared `state`.
async fn serve_stand_in<S, F, Fut>(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<S>,
    answer: F,
    shutdown: crate::shutdown::Shutdown,
) where
    S: Send + Sync + 'static,
    F: Fn(std::sync::Arc<S>, http::Request<hyper::body::Incoming>) -> Fut
        + Copy
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Result<http::Response<StubBody>, BoxError>> + Send + 'static,
{
    let limits = crate::config::ConnectionLimits {
        max_connections: Some(STAND_IN_MAX_CONNECTIONS),
        ..Default::default()
    };
    crate::server::serve(
        listener,
        move |_| {
            let state = state.clone();
            hyper::service::service_fn(move |request| answer(state.clone(), request))
        },
        limits,
        shutdown,
        std::time::Duration::from_secs(1),
    )
    .await;
}
