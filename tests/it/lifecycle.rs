//! Outages of the identity service, secret rotation and start-up, over real sockets. The
//! cadence of retries and refreshes is tested exactly, on paused time, by the refresher's
//! own tests.

use crate::support::*;
use http::{header, StatusCode};
use mosaic_auth_proxy::stub::{Fault, StubAccount, StubSettings};
use std::time::Duration;

fn settings(lifetime_secs: u64) -> StubSettings {
    StubSettings {
        lifetime: Duration::from_secs(lifetime_secs),
        ..StubSettings::default()
    }
}

const SHORT_TOKENS: &str =
    "refresh_margin = \"100ms\"\nrefresh_jitter = 0.0\nexpiry_margin = \"10s\"";

#[tokio::test]
async fn an_outage_covering_the_refresh_but_not_the_expiry_fails_no_request() {
    let stubs = Stubs::start(settings(6)).await;
    let proxy = TestProxy::start(&stubs.config(SHORT_TOKENS, ""))
        .await
        .ready()
        .await;
    let load = traffic(proxy.url("/whoami"), 4);
    stubs.identity.set_fault(Some(Fault::Http500));
    // Wait until the scheduled refresh has failed, stay down a little longer, come back.
    let refresh_failed = eventually(Duration::from_secs(12), async || {
        stubs.identity.token_requests() >= 2
    })
    .await;
    assert!(refresh_failed, "no refresh was attempted");
    tokio::time::sleep(Duration::from_millis(400)).await;
    stubs.identity.set_fault(None);
    let refreshed = eventually(Duration::from_secs(10), async || {
        stubs.identity.tokens_issued() >= 2
    })
    .await;
    assert!(refreshed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (done, failures, sample) = load.stop().await;
    assert!(done > 100, "{done}");
    assert_eq!(failures, 0, "{failures} of {done} failed: {sample:?}");
    assert!(stubs.identity.token_requests() - stubs.identity.tokens_issued() >= 2);
    assert_eq!(stubs.upstream.expired(), 0);
}

#[tokio::test]
async fn an_outage_past_expiry_gives_503_with_retry_after_then_no_failure_once_it_ends() {
    let stubs = Stubs::start(settings(2)).await;
    let proxy = TestProxy::start(&stubs.config(SHORT_TOKENS, ""))
        .await
        .ready()
        .await;
    stubs.identity.set_fault(Some(Fault::Http500));
    let mut unavailable = None;
    let expired = eventually(Duration::from_secs(10), async || {
        let reply = get(&proxy.url("/whoami")).await;
        let is_503 = reply.status == StatusCode::SERVICE_UNAVAILABLE;
        if is_503 {
            unavailable = Some(reply);
        }
        is_503
    })
    .await;
    assert!(expired, "the token never expired");
    let reply = unavailable.unwrap();
    assert!(reply.headers.contains_key(header::RETRY_AFTER));
    assert!(reply.json()["reason"]
        .as_str()
        .unwrap()
        .contains("HTTP 500"));
    assert_eq!(
        stubs.upstream.expired(),
        0,
        "an expired token was forwarded"
    );

    stubs.identity.set_fault(None);
    let back = eventually(Duration::from_secs(10), async || {
        get(&proxy.url("/whoami")).await.status == StatusCode::OK
    })
    .await;
    assert!(back);
    let load = traffic(proxy.url("/whoami"), 4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (done, failures, sample) = load.stop().await;
    assert_eq!(failures, 0, "{failures} of {done} failed: {sample:?}");
}

#[tokio::test]
async fn a_slow_identity_service_is_cut_off_at_the_timeout() {
    let stubs = Stubs::start(StubSettings::default()).await;
    stubs
        .identity
        .set_fault(Some(Fault::Slow(Duration::from_secs(3))));
    let proxy = TestProxy::start(&stubs.config("timeout = \"300ms\"", "")).await;
    let reply = get(&proxy.url("/whoami")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.json()["reason"]
            .as_str()
            .unwrap()
            .contains("did not answer within 300ms"),
        "{}",
        reply.json()
    );
}

#[tokio::test]
async fn a_secret_file_rotated_the_kubernetes_way_is_used_for_the_next_token_without_a_failed_request(
) {
    let dir = std::env::temp_dir().join(format!("map-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/client-secret"), "demo-secret\n").unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/client-secret", dir.join("client-secret")).unwrap();

    let stubs = Stubs::start(StubSettings::default()).await;
    let text = stubs.config("secret_poll = \"50ms\"", "").replace(
        "client_secret_env = \"CLIENT_SECRET\"",
        &format!(
            "client_secret_file = {:?}",
            dir.join("client-secret").display().to_string()
        ),
    );
    let proxy = TestProxy::start(&text).await.ready().await;
    let before = get(&proxy.url("/whoami")).await;
    assert_eq!(before.status, StatusCode::OK);
    let old_token = stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone();
    let load = traffic(proxy.url("/whoami"), 4);

    // The account's secret is rotated: the identity service accepts only the new one, and
    // the mounted secret is swapped like the kubelet does it.
    stubs
        .identity
        .set_accounts(vec![StubAccount::new("demo-client", "rotated-secret")]);
    std::fs::create_dir_all(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/client-secret"), "rotated-secret\n").unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();

    let rotated = eventually(Duration::from_secs(10), async || {
        stubs.identity.tokens_issued() >= 2
    })
    .await;
    assert!(rotated, "no token was requested with the new secret");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (done, failures, sample) = load.stop().await;
    assert_eq!(failures, 0, "{failures} of {done} failed: {sample:?}");
    assert_eq!(
        stubs.identity.token_requests(),
        2,
        "the old secret was used again"
    );
    get(&proxy.url("/whoami")).await;
    assert_ne!(
        stubs.upstream.last().unwrap().headers[header::AUTHORIZATION],
        old_token
    );
    std::fs::remove_dir_all(dir).unwrap();
}
