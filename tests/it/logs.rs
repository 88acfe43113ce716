//! Neither the client secret nor a token ever reaches a log line, at any level.

use crate::support::*;
use http::header;
use mosaic_auth_proxy::mosaic::ErrorCode;
use mosaic_auth_proxy::stub::{Fault, StubSettings};
use std::time::Duration;

// A current-thread runtime keeps every task on the thread whose subscriber captures them.
#[tokio::test(flavor = "current_thread")]
async fn no_secret_and_no_token_is_ever_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("mosaic_auth_proxy=trace,hyper=debug,hyper_util=debug,reqwest=debug")
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = harness(StubSettings::default()).await;
    let mut tokens = Vec::new();
    get(&h.proxy.url("/whoami")).await;
    tokens.push(h.stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone());
    // A rejection, a refresh and a replay.
    h.stubs.upstream.revoke(tokens[0].clone());
    get(&h.proxy.url("/whoami")).await;
    tokens.push(h.stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone());
    // A refused login and its 503.
    h.stubs
        .identity
        .set_fault(Some(Fault::Error(ErrorCode::InvalidClientIdSecret)));
    h.stubs.upstream.revoke(tokens[1].clone());
    get(&h.proxy.url("/whoami")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("obtained an access token"),
        "nothing was captured"
    );
    assert!(text.contains("INVALID_CLIENT_ID_SECRET"), "{text}");
    assert!(!text.contains(SECRET), "the client secret was logged");
    for token in tokens {
        let jwt = token.to_str().unwrap().trim_start_matches("Bearer ");
        let signature = jwt.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "a token was logged");
    }
}
