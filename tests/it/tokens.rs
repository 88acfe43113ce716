//! Obtaining, sharing and rotating tokens.

use crate::support::*;
use http::{Request, StatusCode};
use mosaic_auth_proxy::stub::{Fault, StubSettings};
use std::time::Duration;

#[tokio::test]
async fn a_thousand_concurrent_requests_at_start_up_cause_exactly_one_token_request() {
    let stubs = Stubs::start(StubSettings::default()).await;
    // The first token takes a while, so every request arrives while it is being fetched.
    stubs
        .identity
        .set_fault(Some(Fault::Slow(Duration::from_millis(500))));
    let proxy = TestProxy::start(&stubs.config("", "")).await;
    let client = client();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let client = client.clone();
        let url = proxy.url(&format!("/whoami?i={i}"));
        requests.spawn(async move {
            send(&client, Request::get(url).body(empty()).unwrap())
                .await
                .status
        });
    }
    let mut ok = 0;
    while let Some(status) = requests.join_next().await {
        if status.unwrap() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 1000);
    assert_eq!(stubs.identity.token_requests(), 1);
    assert_eq!(stubs.upstream.accepted(), 1000);
}

#[tokio::test]
async fn tokens_rotate_under_continuous_traffic_without_one_failed_request() {
    let stubs = Stubs::start(StubSettings {
        lifetime: Duration::from_secs(2),
        ..StubSettings::default()
    })
    .await;
    let text = stubs.config("refresh_margin = \"200ms\"\nrefresh_jitter = 0.0", "");
    let proxy = TestProxy::start(&text).await.ready().await;
    let load = traffic(proxy.url("/whoami"), 8);
    // A 2 s token is refreshed every second (its exact cadence is tested on paused time).
    let rotated = eventually(Duration::from_secs(20), async || {
        stubs.identity.token_requests() >= 4
    })
    .await;
    let (done, failures, sample) = load.stop().await;
    assert!(rotated, "the token did not rotate under traffic");
    assert!(done > 100, "only {done} requests were made");
    assert_eq!(
        failures, 0,
        "{failures} of {done} requests failed: {sample:?}"
    );
    assert_eq!(stubs.upstream.expired(), 0);
    assert_eq!(stubs.upstream.refused(), 0);
}
