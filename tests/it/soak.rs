//! The soak: two minutes of traffic across one-second-apart token rotations while the
//! identity service fails one request in three. Long, so not in the default run:
//! `cargo test --release --test it -- --ignored soak`.

use crate::support::*;
use mosaic_auth_proxy::stub::{Fault, StubSettings};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "two minutes; run with: cargo test --release --test it -- --ignored soak"]
async fn soak_two_minutes_of_two_second_tokens_with_a_third_of_token_requests_failing() {
    let stubs = Stubs::start(StubSettings {
        lifetime: Duration::from_secs(2),
        ..StubSettings::default()
    })
    .await;
    let proxy = TestProxy::start(&stubs.config("refresh_margin = \"100ms\"", ""))
        .await
        .ready()
        .await;
    stubs.identity.set_fault_every(3, Some(Fault::Http500));
    let load = traffic(proxy.url("/whoami"), 8);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let (done, failures, sample) = load.stop().await;
    let tokens = stubs.identity.tokens_issued();
    eprintln!("soak: {done} requests, {failures} failed, {tokens} tokens issued");
    assert_eq!(failures, 0, "{failures} of {done} failed: {sample:?}");
    assert_eq!(stubs.upstream.expired(), 0);
    assert!(tokens >= 60, "only {tokens} tokens in two minutes");
}
