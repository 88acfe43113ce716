//! mosaic-auth-proxy: an authenticating reverse proxy for Axinom Mosaic.
//!
//! For each configured service account the proxy obtains an access token from the Mosaic
//! identity service (`authenticateServiceAccount`), caches it in an `ArcSwap` and refreshes
//! it ahead of expiry from one background task per account ([`identity`]). A request flows
//! through [`proxy`]: it is matched to a route by host and path prefix, given the route's
//! account's `Authorization: Bearer <jwt>` (read lock-free, never formatted per request),
//! stripped of hop-by-hop headers and client credentials, and streamed to the upstream; the
//! response streams back. An answer that says the token was refused (HTTP 401, or Mosaic's
//! HTTP 200 with `ACCESS_TOKEN_EXPIRED` and kin) leads to one shared refresh and at most one
//! replay. [`app::App`] binds the listeners, then runs until shutdown.
//! [`stub`] holds local stand-ins for the identity service and a Mosaic service.
// Two exceptions, both in `server::transport`: socket options no safe API sets
// (`set_tcp_option`), and tokio's registration of a listener's own descriptor (`register`).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod commands;
pub mod config;
pub mod demo;
pub mod identity;
pub mod jwt;
pub mod metrics;
pub mod mosaic;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod stub;
pub mod tls;

pub use app::App;

/// The error type of bodies and services whose errors come from more than one place.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pins in a box what `make` makes, built in the box: `Box::pin(value)` builds the value on
/// the stack and copies the whole of it into the box, where a future's size is that of its
/// largest state (kilobytes for a request or a connection), however little of it is in use.
pub fn pin_in_place<T>(make: impl FnOnce() -> T) -> std::pin::Pin<Box<T>> {
    let slot = Box::<T>::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

/// A step that not every request takes (connecting, waiting for a token, keeping a body,
/// reading a small JSON answer) of a future polled for every request, boxed and polled in
/// calls of its own. Boxed inline (`Box::pin`), a step is built on the caller's stack and, with
/// the trained profile, its poll (connecting: the connector, TLS, both handshakes) is inlined
/// into the caller's: either way the caller's frame keeps room for it on every call, used or
/// not. The upstream exchange's poll had a 42 KiB frame, probed page by page at each of its
/// two polls per request, and its locals spread over more lines than the L1 data cache holds.
pub struct Apart<F>(std::pin::Pin<Box<F>>);

/// Makes the rare step `make` builds, boxed in a call of its own ([`Apart`]).
#[inline(never)]
pub fn apart<F: std::future::Future>(make: impl FnOnce() -> F) -> Apart<F> {
    Apart(pin_in_place(make))
}

impl<F: std::future::Future> std::future::Future for Apart<F> {
    type Output = F::Output;

    #[inline(never)]
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// Renders an error with its sources, `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

pub use config::Config;
