//! Hostile and careless clients: every connection bounded in time, number and memory;
//! paths that cannot leave their route; no smuggling past routing; strict request heads.

use crate::support::*;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use mosaic_auth_proxy::stub::StubSettings;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Small limits, so that every bound is hit within a second.
const SMALL_LIMITS: &str = r#"
header_timeout = "300ms"
idle_timeout = "300ms"
body_timeout = "300ms"
write_timeout = "300ms"
"#;

/// How long a test waits for the proxy to act on a bound of a few hundred milliseconds.
const PATIENCE: Duration = Duration::from_secs(5);

async fn proxy_with(stubs: &Stubs, server: &str, rest: &str) -> TestProxy {
    TestProxy::start(&stubs.config_with_server(server, "", rest))
        .await
        .ready()
        .await
}

/// Reads until the peer closes (end of stream or reset); `None` if it is still open after
/// `limit`. Returns what was read.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let reading = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, reading).await.ok()?;
    Some(seen)
}

/// Sends raw bytes on a new connection and reads the answer to the close.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let answer = read_to_close(&mut stream, PATIENCE)
        .await
        .expect("the proxy answers and closes");
    String::from_utf8_lossy(&answer).into_owned()
}

/// An upstream that answers each request head (requests without bodies) with `answer`,
/// and records every byte it receives.
struct RawUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
}

impl RawUpstream {
    async fn start(answer: fn(&str) -> &'static [u8]) -> RawUpstream {
        let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let record = received.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut pending = Vec::new();
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = pending.drain(..end + 4).collect();
                            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                            let _ = stream.write_all(answer(&text)).await;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, received }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).to_ascii_lowercase()
    }
}

fn raw_route(upstream: &RawUpstream) -> String {
    format!(
        "[[routes]]\npath_prefix = \"/raw\"\nupstream = \"http://{}\"\naccount = \"main\"\n",
        upstream.addr
    )
}

// ---- time --------------------------------------------------------------------------------

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, SMALL_LIMITS, "").await;
    for opening in [
        &b""[..],
        b"PRI * HTTP/2.0\r\n",
        b"GET /whoami HTTP/1.1\r\nHost: a\r\n",
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        let closed = read_to_close(&mut stream, PATIENCE).await;
        assert!(closed.is_some(), "still open after {opening:?}");
    }
    assert_eq!(stubs.upstream.requests(), 0);
}

#[tokio::test]
async fn an_http2_connection_that_opens_no_stream_is_closed() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, SMALL_LIMITS, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let seen = read_to_close(&mut stream, PATIENCE)
        .await
        .expect("the connection is closed");
    assert!(
        seen.len() >= 9 && seen[3] == 0x4,
        "the proxy spoke HTTP/2 first"
    );
}

/// An HTTP/1.1 client connection to `addr`, and the task that drives it.
async fn http1_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

/// Asks for `/whoami` on a kept-alive connection and reads the answer.
async fn whoami(sender: &mut hyper::client::conn::http1::SendRequest<TestBody>) {
    let request = Request::get("/whoami")
        .header(header::HOST, "a")
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_over_http1_and_http2() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, SMALL_LIMITS, "").await;

    let (mut sender, driver) = http1_client(proxy.addr).await;
    whoami(&mut sender).await;
    let ended = tokio::time::timeout(PATIENCE, driver).await;
    assert!(ended.is_ok(), "the idle HTTP/1.1 connection stayed open");

    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(connection);
    let request = Request::get(proxy.url("/whoami")).body(empty()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, driver).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection stayed open");
}

#[tokio::test]
async fn a_stalled_kept_body_is_answered_408() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, SMALL_LIMITS, "").await;
    let answer = raw(
        proxy.addr,
        b"POST /whoami HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(
        stubs.upstream.requests(),
        0,
        "a kept body is never forwarded half"
    );
    assert_eq!(proxy.proxy.replay_memory_free(), 64 * 1024 * 1024);
}

#[tokio::test]
async fn a_stalled_streamed_body_is_answered_408_and_the_upstream_released() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, SMALL_LIMITS, "").await;
    // Larger than server.replay_body_limit, so it streams.
    let answer = raw(
        proxy.addr,
        b"POST /whoami HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nonly ten b",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(
        stubs.upstream.requests(),
        1,
        "the streamed body was under way"
    );
    let released = eventually(PATIENCE, async || stubs.upstream.connections().open() == 0).await;
    assert!(released, "the upstream connection was kept");
}

/// Sends a POST of `length` bytes to `path` in pieces of `piece` bytes every `every`, and
/// reads the answer to the close.
async fn paced_upload(
    addr: SocketAddr,
    path: &str,
    length: usize,
    piece: usize,
    every: Duration,
) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reading, mut writing) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    writing.write_all(head.as_bytes()).await.unwrap();
    let sending = tokio::spawn(async move {
        for _ in 0..length / piece {
            tokio::time::sleep(every).await;
            if writing.write_all(&vec![b'x'; piece]).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reading.read_to_end(&mut answer));
    assert!(read.await.is_ok(), "the proxy neither answered nor closed");
    sending.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_trickled_body_is_answered_408_once_it_falls_below_the_minimum_rate() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let server = "body_timeout = \"1s\"\nmin_body_rate = 2000\nreplay_body_limit = 1024";
    let proxy = proxy_with(&stubs, server, "").await;
    // Ten bytes every 200 ms never pause for a whole body_timeout, but average 50 bytes/s.
    // The body streams (it is larger than replay_body_limit); the upstream reads it whole.
    let started = std::time::Instant::now();
    let every = Duration::from_millis(200);
    let answer = paced_upload(proxy.addr, "/whoami", 100_000, 10, every).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("min_body_rate"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let released = eventually(PATIENCE, async || stubs.upstream.connections().open() == 0).await;
    assert!(released, "the upstream connection was kept");

    // 2,000 bytes every 200 ms (10,000 bytes/s) go through, and come back.
    let answer = paced_upload(proxy.addr, "/things/echo", 20_000, 2_000, every).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&"x".repeat(2_000)),
        "the body did not come back whole"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection_and_the_upstream_is_released() {
    const BIG: u64 = 64 * 1024 * 1024;
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, SMALL_LIMITS, "").await;

    // HTTP/1.1: the socket fills and stays full.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("GET /bytes?n={BIG} HTTP/1.1\r\nHost: a\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let opened = eventually(PATIENCE, async || {
        stubs.upstream.connections().opened() == 1
    })
    .await;
    assert!(opened);
    let released = eventually(PATIENCE, async || stubs.upstream.connections().open() == 0).await;
    assert!(released, "the upstream connection is still held");
    let read = read_to_close(&mut stream, PATIENCE)
        .await
        .expect("the client connection was closed");
    assert!((read.len() as u64) < BIG, "the whole answer was sent");

    // HTTP/2: the client grants no more window on its stream.
    let response = h2_client()
        .request(
            Request::get(proxy.url(&format!("/bytes?n={BIG}")))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let opened = eventually(PATIENCE, async || {
        stubs.upstream.connections().opened() == 2
    })
    .await;
    assert!(opened);
    let released = eventually(PATIENCE, async || stubs.upstream.connections().open() == 0).await;
    assert!(
        released,
        "the upstream connection is still held over HTTP/2"
    );
    drop(response);
}

// ---- count and memory --------------------------------------------------------------------

#[cfg(target_os = "linux")]
#[tokio::test]
async fn with_defer_accept_a_connection_that_says_nothing_takes_no_place() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let server = "defer_accept = true\nmax_connections = 1\nworkers = 1";
    let proxy = proxy_with(&stubs, server, "").await;
    // Without the option, the first would take the one place and the request be refused.
    let _silent = TcpStream::connect(proxy.addr).await.unwrap();
    let _also_silent = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..3 {
        let answer = raw(
            proxy.addr,
            b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

#[tokio::test]
async fn connections_over_max_connections_are_refused_while_admitted_ones_and_probes_work() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(
        &stubs,
        "max_connections = 3\n# Accepts in order: one worker.\nworkers = 1",
        "",
    )
    .await;

    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut admitted, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut ask = async || {
        let request = Request::get("/whoami")
            .header(header::HOST, "a")
            .body(empty())
            .unwrap();
        let response = admitted.send_request(request).await.unwrap();
        let status = response.status();
        response.into_body().collect().await.unwrap();
        status
    };
    assert_eq!(ask().await, StatusCode::OK);
    let idle_a = TcpStream::connect(proxy.addr).await.unwrap();
    let _idle_b = TcpStream::connect(proxy.addr).await.unwrap();

    // Accepted in order: the fourth finds every place taken and is closed at once.
    let mut fourth = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = fourth
        .write_all(b"GET /whoami HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let refused = read_to_close(&mut fourth, PATIENCE).await;
    assert_eq!(refused.as_deref(), Some(&b""[..]), "the fourth was served");

    assert_eq!(
        ask().await,
        StatusCode::OK,
        "the admitted connection stopped working"
    );
    let health = get(&format!("http://{}/health", proxy.admin)).await;
    assert_eq!(health.status, StatusCode::OK);

    // A place given back is taken by the next connection.
    drop(idle_a);
    let served = eventually(PATIENCE, async || {
        let answer = raw(
            proxy.addr,
            b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        answer.starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(served);
}

#[tokio::test]
async fn when_replay_memory_is_spent_requests_stream_unkept_and_are_still_served() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let server = "replay_body_limit = 1024\nreplay_memory = 1024\nbody_timeout = \"10s\"";
    let proxy = proxy_with(&stubs, server, "").await;
    let post = |body: &'static str| {
        Request::post(proxy.url("/whoami"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(body))
            .unwrap()
    };
    let revoke_current = async || {
        let reply = get(&proxy.url("/whoami")).await;
        assert_eq!(reply.status, StatusCode::OK);
        let token = stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone();
        stubs.upstream.revoke(token);
    };

    // A client that announces 1,020 bytes and sends ten holds 1,020 of the 1,024.
    let mut staller = TcpStream::connect(proxy.addr).await.unwrap();
    staller
        .write_all(b"POST /whoami HTTP/1.1\r\nHost: a\r\nContent-Length: 1020\r\n\r\nonly ten b")
        .await
        .unwrap();
    let held = eventually(PATIENCE, async || proxy.proxy.replay_memory_free() == 4).await;
    assert!(held);

    // A refused request that could not be kept is answered, not replayed.
    revoke_current().await;
    let before = stubs.upstream.requests();
    let reply = send(&client(), post(r#"{"query":"{ whoami }"}"#)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["errors"][0]["code"],
        "ACCESS_TOKEN_EXPIRED",
        "{:?}",
        reply.body
    );
    assert_eq!(stubs.upstream.requests(), before + 1, "it was replayed");

    // With the budget back, the same request is kept and replayed.
    drop(staller);
    let freed = eventually(PATIENCE, async || proxy.proxy.replay_memory_free() == 1024).await;
    assert!(freed);
    revoke_current().await;
    let reply = send(&client(), post(r#"{"query":"{ whoami }"}"#)).await;
    assert!(
        reply.json()["data"]["whoami"].is_object(),
        "{:?}",
        reply.body
    );
}

// ---- paths -------------------------------------------------------------------------------

#[tokio::test]
async fn no_path_escape_reaches_the_upstream_outside_its_base() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let up = stubs.upstream_addr;
    let routes = format!(
        r#"
[[routes]]
path_prefix = "/media"
strip_prefix = true
upstream = "http://{up}/base"
account = "main"
[[routes]]
path_prefix = "/files"
strip_prefix = true
allow_encoded_slashes = true
upstream = "http://{up}/files-base"
account = "main"
"#
    );
    let proxy = proxy_with(&stubs, "", &routes).await;
    let refused = [
        "/media/../admin/users",
        "/media/%2e%2e/admin/users",
        "/media/%2E%2E/admin/users",
        "/media/.%2e/admin/users",
        "/media/%2e./admin/users",
        "/media/.%2E/%2e./admin",
        "/media/%2e/whoami",
        "/media/..%2fadmin/users",
        "/media/..%2Fadmin/users",
        "/media/%2e%2e%5cadmin",
        "/media/..%5Cadmin",
        "/media/..\\admin",
        "/media/x/..\\..\\admin",
        "/media/a/../../admin",
        "/../media/whoami",
        "/media/%zz",
    ];
    for path in refused {
        let before = stubs.upstream.requests();
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let answer = raw(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert_eq!(stubs.upstream.requests(), before, "{path} was forwarded");
    }
    let forwarded = [
        ("/media/%252e%252e/admin", "/base/%252e%252e/admin"),
        ("/media/x/../whoami", "/base/whoami"),
        ("/media/./whoami", "/base/whoami"),
        ("/m%65dia/whoami", "/base/whoami"),
        ("/media/..;/admin", "/base/..;/admin"),
        ("/files/a%2Fb", "/files-base/a%2Fb"),
    ];
    for (path, expected) in forwarded {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let answer = raw(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert_eq!(stubs.upstream.last().unwrap().path, expected, "{path}");
    }
}

#[tokio::test]
async fn an_overlong_request_target_is_answered_414() {
    let h = harness(StubSettings::default()).await;
    let path = format!("/whoami?q={}", "x".repeat(20_000));
    let reply = get(&h.proxy.url(&path)).await;
    assert_eq!(reply.status, StatusCode::URI_TOO_LONG);
    assert_eq!(reply.json()["error"], "uri_too_long");
    assert_eq!(h.stubs.upstream.requests(), 0);
}

#[tokio::test]
async fn oversized_heads_are_answered_431() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, "max_header_bytes = 8192\nmax_headers = 10", "").await;
    let big = format!(
        "GET /whoami HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let many: String = (0..11).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET /whoami HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    for head in [big, many] {
        let answer = raw(proxy.addr, head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
    assert_eq!(stubs.upstream.requests(), 0);
}

// ---- headers -----------------------------------------------------------------------------

const HOP_BY_HOP_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: close, X-Internal\r\n\
X-Internal: upstream-secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
Upgrade: foo\r\nX-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok";

#[tokio::test]
async fn hop_by_hop_headers_of_answers_are_removed_and_the_proxy_keeps_its_connection() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let upstream = RawUpstream::start(|_| HOP_BY_HOP_ANSWER).await;
    let proxy = proxy_with(&stubs, "", &raw_route(&upstream)).await;
    let check = |headers: &http::HeaderMap| {
        for gone in [
            "connection",
            "x-internal",
            "keep-alive",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(!headers.contains_key(gone), "{gone} reached the client");
        }
        assert_eq!(headers["x-end-to-end"], "kept");
    };

    // HTTP/1.1: two requests on one client connection, though the upstream said close.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        let request = Request::get("/raw/x")
            .header(header::HOST, "a")
            .body(empty())
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .expect("the connection was kept");
        check(response.headers());
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
    }

    // HTTP/2.
    let request = Request::get(proxy.url("/raw/x")).body(empty()).unwrap();
    let reply = send(&h2_client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    check(&reply.headers);

    // HTTP/1.0: not told keep-alive, and closed after the answer.
    let answer = raw(proxy.addr, b"GET /raw/x HTTP/1.0\r\nHost: a\r\n\r\n").await;
    assert!(answer.contains(" 200 "), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("keep-alive"),
        "{answer}"
    );
}

#[tokio::test]
async fn only_websocket_upgrades_are_tunnelled_and_no_tunnel_bytes_reach_the_upstream() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let upstream = RawUpstream::start(|head| {
        if head.contains("upgrade:") {
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        }
    })
    .await;
    let proxy = proxy_with(&stubs, "", &raw_route(&upstream)).await;
    for protocol in ["h2c", "my-own-protocol"] {
        let request = format!(
            "GET /raw/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
             Upgrade: {protocol}\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n\
             SMUGGLED /admin HTTP/1.1\r\n\r\n"
        );
        let answer = raw(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{protocol}: {answer}");
    }
    let received = upstream.received();
    assert!(received.contains("get /raw/x http/1.1"), "{received}");
    for absent in ["upgrade", "http2-settings", "smuggled", "/admin"] {
        assert!(
            !received.contains(absent),
            "{absent} reached the upstream: {received}"
        );
    }
}

#[tokio::test]
async fn an_upstream_that_switches_protocols_unasked_gets_its_client_a_502() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let upstream = RawUpstream::start(|_| {
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    })
    .await;
    let proxy = proxy_with(&stubs, "", &raw_route(&upstream)).await;
    // Asked for nothing, or for a protocol the route does not allow (not passed on).
    for upgrade in ["", "Connection: upgrade\r\nUpgrade: my-own-protocol\r\n"] {
        let request =
            format!("GET /raw/x HTTP/1.1\r\nHost: a\r\n{upgrade}Connection: close\r\n\r\n");
        let answer = raw(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{upgrade:?}: {answer}");
        assert!(answer.contains("upstream_failed"), "{answer}");
    }
    assert!(upstream.received().contains("get /raw/x"));
}

#[tokio::test]
async fn http1_requests_need_exactly_one_valid_host() {
    let h = harness(StubSettings::default()).await;
    for head in [
        "GET /whoami HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /whoami HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        "GET /whoami HTTP/1.1\r\nHost: user@evil.example\r\nConnection: close\r\n\r\n",
        "GET /whoami HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw(h.proxy.addr, head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{head:?}: {answer}");
        assert!(answer.contains("bad_host"), "{answer}");
    }
    assert_eq!(h.stubs.upstream.requests(), 0);
    // HTTP/1.0 may leave Host out.
    let answer = raw(h.proxy.addr, b"GET /whoami HTTP/1.0\r\n\r\n").await;
    assert!(answer.contains(" 200 "), "{answer}");
}

#[tokio::test]
async fn trace_is_refused_405_and_never_forwarded() {
    let h = harness(StubSettings::default()).await;
    let request = Request::builder()
        .method(Method::TRACE)
        .uri(h.proxy.url("/whoami"))
        .body(empty())
        .unwrap();
    let reply = send(&client(), request).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.json()["error"], "trace_refused");
    assert_eq!(h.stubs.upstream.requests(), 0);
}

#[tokio::test]
async fn forwarding_headers_are_replaced_unless_the_client_is_a_trusted_proxy() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let spoofed = || {
        Request::builder()
            .header("x-forwarded-for", "10.9.9.9")
            .header("x-real-ip", "10.9.9.9")
            .header("forwarded", "for=10.9.9.9")
            .header("x-forwarded-host", "evil.example")
    };
    let untrusted = proxy_with(&stubs, "", "").await;
    let request = spoofed()
        .uri(untrusted.url("/whoami"))
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    let seen = stubs.upstream.last().unwrap().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-real-ip"], "127.0.0.1");
    assert_eq!(seen["forwarded"], "for=127.0.0.1;proto=http");
    assert_eq!(
        seen["x-forwarded-host"],
        untrusted.addr.to_string().as_str()
    );

    let trusted = proxy_with(&stubs, "trusted_proxies = [\"127.0.0.0/8\"]", "").await;
    let request = spoofed().uri(trusted.url("/whoami")).body(empty()).unwrap();
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    let seen = stubs.upstream.last().unwrap().headers;
    assert_eq!(seen["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(seen["x-real-ip"], "10.9.9.9");
    assert_eq!(seen["forwarded"], "for=10.9.9.9, for=127.0.0.1;proto=http");
    assert_eq!(seen["x-forwarded-host"], "evil.example");

    // Only what `server.forwarding_headers` lists is sent; an untrusted client's own never.
    let some = proxy_with(
        &stubs,
        "forwarding_headers = [\"x-forwarded-for\", \"x-forwarded-proto\"]",
        "",
    )
    .await;
    let request = spoofed().uri(some.url("/whoami")).body(empty()).unwrap();
    assert_eq!(send(&client(), request).await.status, StatusCode::OK);
    let seen = stubs.upstream.last().unwrap().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    for gone in ["x-real-ip", "forwarded", "x-forwarded-host"] {
        assert!(!seen.contains_key(gone), "{gone} reached the upstream");
    }
}

fn full(text: &'static str) -> TestBody {
    http_body_util::Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

#[tokio::test]
async fn an_upgraded_tunnel_is_part_of_the_drain_and_closed_when_the_grace_period_ends() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let upstream = RawUpstream::start(|_| {
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    })
    .await;
    let text = stubs
        .config("", &raw_route(&upstream))
        .replace("[server]", "[server]\nshutdown_grace = \"300ms\"");
    let Stoppable {
        addr,
        trigger,
        running,
    } = start_stoppable(&text).await;

    let mut tunnel = TcpStream::connect(addr).await.unwrap();
    tunnel
        .write_all(
            b"GET /raw/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tunnel.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );

    trigger.trigger();
    let closed = read_to_close(&mut tunnel, PATIENCE).await;
    assert!(closed.is_some(), "the tunnel outlived the drain");
    tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the proxy stopped")
        .unwrap();
}

#[tokio::test]
async fn workers_share_max_connections() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = proxy_with(&stubs, "max_connections = 2\nworkers = 4", "").await;
    let open = async || {
        let text = get(&format!("http://{}/metrics", proxy.admin)).await.body;
        let text = String::from_utf8_lossy(&text).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("mosaic_auth_proxy_client_connections "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Two connections, wherever the kernel puts them, hold both places of all four workers.
    let _a = TcpStream::connect(proxy.addr).await.unwrap();
    let _b = TcpStream::connect(proxy.addr).await.unwrap();
    let held = eventually(PATIENCE, async || open().await == 2.0).await;
    assert!(held, "the two connections were not both accepted");
    for _ in 0..8 {
        let mut more = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = more
            .write_all(b"GET /whoami HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        let refused = read_to_close(&mut more, PATIENCE).await;
        assert_eq!(
            refused.as_deref(),
            Some(&b""[..]),
            "a worker served past the shared limit"
        );
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_kept_for_idle_timeout_not_header_timeout() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let limits = "header_timeout = \"200ms\"\nidle_timeout = \"10s\"\n";
    let proxy = proxy_with(&stubs, limits, "").await;
    let (mut sender, driver) = http1_client(proxy.addr).await;
    for _ in 0..2 {
        whoami(&mut sender).await;
        // Idle for several header timeouts, well within the idle timeout.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!driver.is_finished(), "the idle connection was closed");
    }
}

/// Reads one answer with a `Content-Length` body off a kept-alive connection.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before the answer was complete");
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if seen.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn a_later_request_head_sent_slowly_is_dropped_at_the_header_timeout() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let limits = "header_timeout = \"300ms\"\nidle_timeout = \"60s\"\n";
    let proxy = proxy_with(&stubs, limits, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /whoami HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Idle long enough to be seen idle; then the next head begins, and never ends.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream
        .write_all(b"GET /whoami HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let closed = read_to_close(&mut stream, PATIENCE).await;
    assert_eq!(closed.as_deref(), Some(&b""[..]), "still open, or answered");
    assert_eq!(stubs.upstream.requests(), 1);
}
