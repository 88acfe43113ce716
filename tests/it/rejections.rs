//! Upstream token rejections: one shared refresh, at most one replay, never a loop.

use crate::support::*;
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use mosaic_auth_proxy::mosaic::ErrorCode;
use mosaic_auth_proxy::stub::body::PatternBody;
use mosaic_auth_proxy::stub::{Fault, StubSettings};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one request and returns the token the upstream saw with it.
async fn current_token(h: &Harness) -> http::HeaderValue {
    assert_eq!(get(&h.proxy.url("/whoami")).await.status, StatusCode::OK);
    h.stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone()
}

/// Every field the upstream read but the token, with its values, in their order.
fn fields_but_token(seen: &mosaic_auth_proxy::stub::upstream::Seen) -> Vec<(String, Vec<u8>)> {
    seen.headers
        .iter()
        .filter(|(name, _)| *name != header::AUTHORIZATION)
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect()
}

#[tokio::test]
async fn an_expired_token_refused_once_costs_one_refresh_and_one_replay_even_for_100_requests() {
    let h = harness(StubSettings::default()).await;
    let token = current_token(&h).await;
    h.stubs.upstream.revoke(token.clone());
    // The upstream answers none until all 100 are in, so every one carries the revoked token.
    h.stubs.upstream.hold_until(100);
    let client = client();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..100 {
        let client = client.clone();
        let url = h.proxy.url(&format!("/whoami?i={i}"));
        requests
            .spawn(async move { send(&client, Request::get(url).body(empty()).unwrap()).await });
    }
    while let Some(reply) = requests.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            reply.json()["data"]["whoami"].is_object(),
            "{:?}",
            reply.body
        );
    }
    // Every request was refused once and replayed exactly once, and the refresh was shared.
    let refused = h.stubs.upstream.expired();
    assert_eq!(refused, 100, "only {refused} carried the revoked token");
    assert_eq!(h.stubs.upstream.requests(), 1 + 100 + 100);
    assert_eq!(h.stubs.identity.token_requests(), 2);
    let after = current_token(&h).await;
    assert_ne!(after, token);
}

#[tokio::test]
async fn a_replayed_request_is_the_refused_one_with_only_the_token_changed() {
    let h = harness(StubSettings::default()).await;
    let token = current_token(&h).await;
    h.stubs.upstream.revoke(token.clone());
    let body = r#"{"query":"mutation { importVideo(id: 7) { id } }"}"#;
    let request = Request::post(h.proxy.url("/graphql/echo?op=import&x=1"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/graphql-response+json")
        .header(header::USER_AGENT, "legacy-importer/2.1")
        .header("x-trace", "one")
        .header("x-request-id", "4f1c")
        .header("x-trace", "two")
        .header(
            "x-note",
            http::HeaderValue::from_bytes(b"caf\xe9\tend").unwrap(),
        )
        .body(
            http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let reply = send(&client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, body.as_bytes(), "the replay carried the body");

    let recent = h.stubs.upstream.recent();
    let [.., refused, replayed] = &recent[..] else {
        panic!("the upstream saw {} requests", recent.len());
    };
    assert_eq!(refused.verdict, Err(ErrorCode::AccessTokenExpired));
    assert!(replayed.verdict.is_ok(), "{:?}", replayed.verdict);
    assert_eq!(refused.headers[header::AUTHORIZATION], token);
    assert_ne!(replayed.headers[header::AUTHORIZATION], token);
    assert_eq!(
        (&replayed.method, &replayed.path, &replayed.query),
        (&refused.method, &refused.path, &refused.query)
    );
    // Every other field, its values and their order as the upstream read them.
    assert_eq!(fields_but_token(replayed), fields_but_token(refused));
    let traces: Vec<_> = replayed.headers.get_all("x-trace").iter().collect();
    assert_eq!(traces, ["one", "two"]);
    assert_eq!(replayed.headers["x-note"].as_bytes(), b"caf\xe9\tend");
    assert_eq!(replayed.headers[header::USER_AGENT], "legacy-importer/2.1");
    assert!(replayed.headers.contains_key("x-forwarded-for"));
}

#[tokio::test]
async fn a_replay_from_a_trusted_proxy_extends_its_forwarding_headers_once() {
    // The kept head has no forwarding headers of this hop: the replay makes them again.
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy =
        TestProxy::start(&stubs.config_with_server("trusted_proxies = [\"127.0.0.0/8\"]", "", ""))
            .await
            .ready()
            .await;
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    let token = stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone();
    stubs.upstream.revoke(token);
    let request = Request::get(proxy.url("/whoami"))
        .header(header::HOST, "media.example")
        .header("x-forwarded-for", "10.9.9.9")
        .header("forwarded", "for=10.9.9.9")
        .header("x-real-ip", "10.9.9.9")
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);

    let recent = stubs.upstream.recent();
    let [.., refused, replayed] = &recent[..] else {
        panic!("the upstream saw {} requests", recent.len());
    };
    assert_eq!(refused.verdict, Err(ErrorCode::AccessTokenExpired));
    assert!(replayed.verdict.is_ok(), "{:?}", replayed.verdict);
    for seen in [refused, replayed] {
        let h = &seen.headers;
        assert_eq!(h["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
        assert_eq!(h["forwarded"], "for=10.9.9.9, for=127.0.0.1;proto=http");
        assert_eq!(h["x-real-ip"], "10.9.9.9");
        assert_eq!(h["x-forwarded-host"], "media.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }
    assert_eq!(fields_but_token(replayed), fields_but_token(refused));
}

#[tokio::test]
async fn a_late_rejection_of_an_old_token_keeps_the_newer_one() {
    let h = harness(StubSettings::default()).await;
    let old = current_token(&h).await;
    // A slow request carries the old token; the upstream checks it after the rotation.
    let slow = tokio::spawn(get_owned(h.proxy.url("/slow")));
    let arrived = eventually(Duration::from_secs(5), async || {
        h.stubs.upstream.requests() == 2
    })
    .await;
    assert!(arrived);
    h.stubs.upstream.revoke(old.clone());
    let reply = get(&h.proxy.url("/whoami")).await;
    assert!(reply.json()["data"]["whoami"].is_object());
    assert_eq!(h.stubs.identity.token_requests(), 2);
    // The old token's late rejection is replayed with the new token, which is kept.
    let reply = slow.await.unwrap();
    assert!(
        reply.json()["data"]["whoami"].is_object(),
        "{:?}",
        reply.body
    );
    assert_eq!(
        h.stubs.identity.token_requests(),
        2,
        "the newer token was dropped"
    );
}

async fn get_owned(url: String) -> Reply {
    get(&url).await
}

#[tokio::test]
async fn user_not_authorized_passes_through_untouched_with_no_refresh_and_no_replay() {
    let h = harness(StubSettings::default()).await;
    let reply = get(&h.proxy.url("/media/forbidden")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["errors"][0]["code"], "USER_NOT_AUTHORIZED");
    assert_eq!(h.stubs.upstream.requests(), 1);
    assert_eq!(h.stubs.identity.token_requests(), 1);
}

#[tokio::test]
async fn an_http_401_is_a_rejection_too() {
    // A plain upstream that answers 401 to the first request and 200 after.
    let h = harness(StubSettings::default()).await;
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen_in = seen.clone();
    let (_trigger, signal) = mosaic_auth_proxy::shutdown::channel();
    tokio::spawn(mosaic_auth_proxy::server::serve(
        listener,
        move |_| {
            let seen = seen_in.clone();
            hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let mut r = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"{}"),
                    ));
                    if n == 0 {
                        *r.status_mut() = StatusCode::UNAUTHORIZED;
                    }
                    Ok::<_, std::convert::Infallible>(r)
                }
            })
        },
        Default::default(),
        None,
        None,
        signal,
        Duration::from_secs(1),
    ));
    let text = h.stubs.config("", &format!("[[routes]]\npath_prefix = \"/plain\"\nupstream = \"http://{addr}\"\naccount = \"main\"\n"));
    let proxy = TestProxy::start(&text).await.ready().await;
    let before = h.stubs.identity.token_requests();
    let reply = get(&proxy.url("/plain/x")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(h.stubs.identity.token_requests(), before + 1);
}

#[tokio::test]
async fn a_rejection_no_fresh_token_cures_costs_a_bounded_number_of_refreshes_then_the_breaker_holds(
) {
    let h = harness(StubSettings::default()).await;
    h.stubs
        .upstream
        .refuse_all(Some(ErrorCode::SigningKeyNotFound));
    for _ in 0..10 {
        let reply = get(&h.proxy.url("/whoami")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["errors"][0]["code"], "SIGNING_KEY_NOT_FOUND");
    }
    let (tokens, upstream) = (
        h.stubs.identity.token_requests(),
        h.stubs.upstream.requests(),
    );
    assert!(tokens <= 5, "{tokens} token requests");
    assert!(upstream <= 14, "{upstream} upstream requests");
    // The breaker holds: rejections now pass straight through.
    for _ in 0..10 {
        get(&h.proxy.url("/whoami")).await;
    }
    assert_eq!(h.stubs.identity.token_requests(), tokens);
    assert_eq!(h.stubs.upstream.requests(), upstream + 10);
}

#[tokio::test]
async fn a_request_too_large_to_replay_gets_the_upstream_answer_and_the_next_request_a_new_token() {
    let h = harness(StubSettings::default()).await;
    let token = current_token(&h).await;
    h.stubs.upstream.revoke(token.clone());
    let upload = PatternBody::new(1024 * 1024)
        .map_err(|never| match never {})
        .boxed();
    let request = Request::post(h.proxy.url("/graphql")).body(upload).unwrap();
    let reply = send(&client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["errors"][0]["code"], "ACCESS_TOKEN_EXPIRED");
    assert_eq!(
        h.stubs.upstream.requests(),
        2,
        "the large request was replayed"
    );
    let reply = get(&h.proxy.url("/whoami")).await;
    assert!(reply.json()["data"]["whoami"].is_object());
    assert_ne!(
        h.stubs.upstream.last().unwrap().headers[header::AUTHORIZATION],
        token
    );
    assert_eq!(h.stubs.identity.token_requests(), 2);
}

#[tokio::test]
async fn a_route_that_forbids_replay_passes_the_rejection_through_and_refreshes() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = TestProxy::start(&stubs.config("", "replay = false"))
        .await
        .ready()
        .await;
    assert_eq!(get(&proxy.url("/a")).await.status, StatusCode::OK);
    stubs
        .upstream
        .revoke(stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone());
    let reply = get(&proxy.url("/b")).await;
    assert_eq!(reply.json()["errors"][0]["code"], "ACCESS_TOKEN_EXPIRED");
    let reply = get(&proxy.url("/c")).await;
    assert!(reply.json()["data"]["whoami"].is_object());
    assert_eq!(stubs.upstream.requests(), 3);
}

#[tokio::test]
async fn a_refresh_that_returns_the_same_token_is_not_replayed_and_backs_off() {
    let h = harness(StubSettings::default()).await;
    let token = current_token(&h).await;
    h.stubs.upstream.revoke(token.clone());
    h.stubs.identity.set_fault(Some(Fault::SameToken));
    let before = h.stubs.upstream.requests();
    for _ in 0..5 {
        let reply = get(&h.proxy.url("/whoami")).await;
        assert_eq!(reply.json()["errors"][0]["code"], "ACCESS_TOKEN_EXPIRED");
    }
    // Each request reached the upstream once: a token equal to the refused one is no cure.
    assert_eq!(
        h.stubs.upstream.requests(),
        before + 5,
        "a request was replayed"
    );
    // The breaker sees the same token refused again and again: asking stops.
    let tokens = h.stubs.identity.token_requests();
    assert!(tokens <= 5, "{tokens} token requests");
    h.stubs.identity.set_fault(None);
}

async fn websocket(proxy: &TestProxy) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = "GET /graphql/ws HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .expect("the upstream closes the socket")
        .unwrap();
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_websocket_closed_with_4403_brings_a_fresh_token_for_the_reconnect() {
    let h = harness(StubSettings::default()).await;
    let answer = websocket(&h.proxy).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(contains(
        &answer,
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    ));
    assert!(contains(&answer, b"hello demo-client"));

    let token = current_token(&h).await;
    h.stubs.upstream.revoke(token.clone());
    let answer = websocket(&h.proxy).await;
    assert!(
        contains(&answer, &[0x88, 0x02, 0x11, 0x33]),
        "no close 4403"
    );
    let refreshed = eventually(Duration::from_secs(5), async || {
        h.stubs.identity.token_requests() == 2
    })
    .await;
    assert!(refreshed, "the close did not bring a refresh");
    let answer = websocket(&h.proxy).await;
    assert!(
        contains(&answer, b"hello demo-client"),
        "the reconnect failed"
    );
}
