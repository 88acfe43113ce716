//! Identity service failures: clear 503s while there is no token, recovery when it answers.

use crate::support::*;
use http::{header, StatusCode};
use mosaic_auth_proxy::mosaic::ErrorCode;
use mosaic_auth_proxy::stub::{Fault, StubSettings};
use std::time::Duration;

async fn fails_clearly_then_recovers(fault: Fault, reason: &str) {
    let stubs = Stubs::start(StubSettings::default()).await;
    stubs.identity.set_fault(Some(fault.clone()));
    let proxy = TestProxy::start(&stubs.config("timeout = \"300ms\"", "")).await;
    let reply = get(&proxy.url("/whoami")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
    let retry_after: u64 = reply.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body = reply.json();
    assert_eq!(body["error"], "token_unavailable");
    let text = body["reason"].as_str().unwrap_or_default();
    assert!(text.contains(reason), "{fault:?}: {body}");
    assert_eq!(stubs.upstream.requests(), 0, "forwarded without a token");

    stubs.identity.set_fault(None);
    let recovered = eventually(Duration::from_secs(5), async || {
        get(&proxy.url("/whoami")).await.status == StatusCode::OK
    })
    .await;
    assert!(recovered, "{fault:?}: no recovery");
    assert_eq!(stubs.upstream.expired() + stubs.upstream.refused(), 0);
}

#[tokio::test]
async fn refused_credentials_give_503_naming_the_code_then_recover() {
    fails_clearly_then_recovers(
        Fault::Error(ErrorCode::InvalidClientIdSecret),
        "INVALID_CLIENT_ID_SECRET",
    )
    .await;
}

#[tokio::test]
async fn a_transient_graphql_error_gives_503_naming_the_code_then_recovers() {
    fails_clearly_then_recovers(
        Fault::Error(ErrorCode::InternalServerError),
        "INTERNAL_SERVER_ERROR",
    )
    .await;
}

#[tokio::test]
async fn an_identity_service_answering_500_gives_503_then_recovers() {
    fails_clearly_then_recovers(Fault::Http500, "HTTP 500").await;
}

#[tokio::test]
async fn an_identity_service_answering_garbage_gives_503_then_recovers() {
    fails_clearly_then_recovers(Fault::Garbage, "not JSON").await;
}

#[tokio::test]
async fn an_identity_service_that_hangs_up_gives_503_then_recovers() {
    fails_clearly_then_recovers(Fault::Reset, "request to the identity service failed").await;
}

#[tokio::test]
async fn an_identity_service_that_answers_nothing_gives_503_then_recovers() {
    fails_clearly_then_recovers(Fault::Hang, "did not answer").await;
}

#[tokio::test]
async fn broken_replies_give_503_then_recover() {
    fails_clearly_then_recovers(Fault::NullData, "carries no token").await;
    fails_clearly_then_recovers(Fault::NullPayload, "carries no token").await;
    fails_clearly_then_recovers(Fault::Huge, "larger than").await;
}

#[tokio::test]
async fn an_identity_service_that_is_not_listening_gives_503_then_recovers() {
    let addr = std::net::TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap();
    let stubs = Stubs::start(StubSettings::default()).await;
    let text = stubs
        .config("", "")
        .replace(stubs.identity.origin(), &format!("http://{addr}"));
    let proxy = TestProxy::start(&text).await;
    let reply = get(&proxy.url("/whoami")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.json()["reason"]
        .as_str()
        .unwrap()
        .contains("cannot connect"));
    // The identity service appears on that address.
    let late = mosaic_auth_proxy::stub::IdentityStub::bind(
        addr,
        StubSettings::default(),
        mosaic_auth_proxy::stub::SigningKey::bundled(),
    )
    .await
    .unwrap();
    let late_handle = late.handle();
    let (trigger, signal) = mosaic_auth_proxy::shutdown::channel();
    tokio::spawn(late.run(signal));
    let recovered = eventually(Duration::from_secs(5), async || {
        get(&proxy.url("/whoami")).await.status == StatusCode::OK
    })
    .await;
    assert!(recovered);
    assert!(late_handle.tokens_issued() >= 1);
    trigger.trigger();
}
