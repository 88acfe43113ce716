//! What reaches the upstream, what comes back, and what the proxy refuses.

use crate::support::*;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use mosaic_auth_proxy::jwt;
use mosaic_auth_proxy::stub::body::{pattern_byte, PatternBody};
use mosaic_auth_proxy::stub::{StubAccount, StubSettings};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_upstream_receives_exactly_the_injected_token_and_none_of_the_client_credentials() {
    let h = harness(StubSettings::default()).await;
    let request = Request::get(h.proxy.url("/graphql?a=1&access_token=leaked&b=2"))
        .header(header::AUTHORIZATION, "Bearer client-token")
        .header(header::PROXY_AUTHORIZATION, "Basic cHJveHk6cHc=")
        .header(header::CONNECTION, "keep-alive, x-hop")
        .header("x-hop", "per-connection")
        .header("keep-alive", "timeout=5")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-end-to-end", "kept")
        .body(empty())
        .unwrap();
    let reply = send(&client(), request).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);

    let seen = h
        .stubs
        .upstream
        .last()
        .expect("the upstream saw the request");
    let claims = seen
        .verdict
        .clone()
        .expect("the upstream accepted the token");
    assert_eq!(claims["iss"], "ax-id-service");
    assert_eq!(claims["subjectType"], "ServiceAccount");
    let auth = seen.headers[header::AUTHORIZATION].to_str().unwrap();
    let token = auth
        .strip_prefix("Bearer ")
        .expect("exactly `Bearer <jwt>`");
    assert_eq!(
        seen.headers.get_all(header::AUTHORIZATION).iter().count(),
        1
    );
    let parts = jwt::decode(token).expect("a JWT");
    assert_eq!(parts.header["alg"], "RS256");
    let jwks = get(&h.stubs.identity.jwks_url()).await.json();
    assert_eq!(jwks["keys"][0]["kid"], parts.header["kid"]);

    assert_eq!(seen.path, "/graphql");
    assert_eq!(seen.query.as_deref(), Some("a=1&b=2"));
    for gone in ["proxy-authorization", "x-hop", "keep-alive", "connection"] {
        assert!(!seen.headers.contains_key(gone), "{gone} was forwarded");
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
    // A client of its own is not trusted to name earlier hops.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-real-ip"], "127.0.0.1");
    assert_eq!(seen.headers["forwarded"], "for=127.0.0.1;proto=http");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        h.proxy.addr.to_string().as_str()
    );
    assert_eq!(
        seen.headers["host"],
        h.stubs.upstream_addr.to_string().as_str()
    );
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let h = harness(StubSettings::default()).await;
    let request = Request::get(h.proxy.url("/whoami")).body(empty()).unwrap();
    let reply = send(&h2_client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["data"]["whoami"]["name"],
        "demo-client (stand-in)"
    );
}

#[tokio::test]
async fn each_http2_request_forwards_its_own_authority_as_x_forwarded_host() {
    let h = harness(StubSettings::default()).await;
    let tcp = tokio::net::TcpStream::connect(h.proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    // One connection; the authority changes, and comes back.
    let port = h.proxy.addr.port();
    for host in ["localhost", "127.0.0.1", "127.0.0.1", "localhost"] {
        let authority = format!("{host}:{port}");
        let request = Request::get(format!("http://{authority}/whoami"))
            .body(empty())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
        let seen = h.stubs.upstream.last().expect("the upstream saw it");
        assert_eq!(seen.headers["x-forwarded-host"], authority.as_str());
    }
}

/// Opens an HTTP/2 connection with prior knowledge to `addr`.
async fn h2_connection(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

#[tokio::test]
async fn the_streams_of_one_http2_connection_are_served_at_once() {
    let h = harness(StubSettings::default()).await;
    let sender = h2_connection(h.proxy.addr).await;
    // The upstream answers none until all have arrived: one stream held up by another
    // would leave the first answer ten seconds away and the count short.
    const STREAMS: u64 = 32;
    let before = h.stubs.upstream.requests();
    h.stubs.upstream.hold_until(STREAMS);
    let mut answers = futures_util::stream::FuturesUnordered::new();
    for i in 0..STREAMS {
        let mut sender = sender.clone();
        let request = Request::get(h.proxy.url(&format!("/whoami?stream={i}")))
            .body(empty())
            .unwrap();
        answers.push(async move {
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        });
    }
    let mut answered = 0;
    while let Some((status, body)) = futures_util::StreamExt::next(&mut answers).await {
        if answered == 0 {
            assert_eq!(h.stubs.upstream.requests() - before, STREAMS);
        }
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["data"]["whoami"]["name"], "demo-client (stand-in)");
        answered += 1;
    }
    assert_eq!(answered, STREAMS);
    assert_eq!(h.stubs.upstream.accepted(), STREAMS + before);
}

#[tokio::test]
async fn shutdown_lets_an_http2_stream_in_flight_finish() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let text = stubs
        .config("", "")
        .replace("[server]", "[server]\nshutdown_grace = \"10s\"");
    let Stoppable {
        addr,
        trigger,
        running,
    } = start_stoppable(&text).await;
    let mut sender = h2_connection(addr).await;
    // Held by the upstream until a second request comes.
    stubs.upstream.hold_until(2);
    let request = Request::get(format!("http://{addr}/whoami"))
        .body(empty())
        .unwrap();
    let in_flight = tokio::spawn(async move {
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    });
    let upstream = stubs.upstream.clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while upstream.requests() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the request reaches the upstream");
    trigger.trigger();
    // Draining now; a second request, straight to the upstream, lets the first go.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!in_flight.is_finished(), "the stream waits for its answer");
    let direct = format!("http://{}/released", stubs.upstream_addr);
    client()
        .request(Request::get(direct).body(empty()).unwrap())
        .await
        .unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the stream is answered once the upstream lets it go")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["data"]["whoami"]["name"], "demo-client (stand-in)");
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the proxy stops once its last stream has ended")
        .unwrap();
}

#[tokio::test]
async fn two_accounts_on_two_routes_inject_two_different_tokens() {
    let mut settings = StubSettings::default();
    settings
        .accounts
        .push(StubAccount::new("second-client", "second-secret"));
    let stubs = Stubs::start(settings).await;
    let text = format!(
        r#"
[identity]
origin = "{origin}"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[accounts.first]
client_id = "demo-client"
client_secret_env = "CLIENT_SECRET"
[accounts.second]
client_id = "second-client"
client_secret_env = "SECOND_SECRET"
[[routes]]
path_prefix = "/first"
strip_prefix = true
upstream = "http://{up}"
account = "first"
[[routes]]
path_prefix = "/second"
strip_prefix = true
upstream = "http://{up}"
account = "second"
"#,
        origin = stubs.identity.origin(),
        up = stubs.upstream_addr
    );
    let proxy = TestProxy::start(&text).await.ready().await;
    let first = get(&proxy.url("/first/whoami")).await.json();
    let first_seen = stubs.upstream.last().unwrap();
    let second = get(&proxy.url("/second/whoami")).await.json();
    let second_seen = stubs.upstream.last().unwrap();
    assert_eq!(first["data"]["whoami"]["name"], "demo-client (stand-in)");
    assert_eq!(second["data"]["whoami"]["name"], "second-client (stand-in)");
    assert_ne!(
        first["data"]["whoami"]["sub"],
        second["data"]["whoami"]["sub"]
    );
    assert_ne!(
        first_seen.headers[header::AUTHORIZATION],
        second_seen.headers[header::AUTHORIZATION]
    );
    assert_eq!(first_seen.path, "/whoami");
    assert_eq!(second_seen.path, "/whoami");
    assert_eq!(stubs.identity.token_requests(), 2);
}

const LARGE: u64 = 48 * 1024 * 1024;

async fn check_pattern(body: hyper::body::Incoming) -> u64 {
    let mut body = body;
    let mut at = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the body streams without error");
        if let Ok(data) = frame.into_data() {
            for (i, byte) in data.iter().enumerate() {
                assert_eq!(*byte, pattern_byte(at + i as u64), "byte {}", at + i as u64);
            }
            at += data.len() as u64;
        }
    }
    at
}

#[tokio::test]
async fn a_large_body_streams_intact_in_both_directions() {
    let h = harness(StubSettings::default()).await;
    let upload = PatternBody::new(LARGE)
        .map_err(|never| match never {})
        .boxed();
    let request = Request::post(h.proxy.url("/upload/echo"))
        .body(upload)
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(check_pattern(response.into_body()).await, LARGE);

    let request = Request::get(h.proxy.url(&format!("/download/bytes?n={LARGE}")))
        .body(empty())
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(check_pattern(response.into_body()).await, LARGE);
}

#[tokio::test]
async fn requests_no_route_matches_get_404_with_a_json_reason() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let text = stubs.config("", "").replace(
        "account = \"main\"",
        "account = \"main\"\npath_prefix = \"/media\"",
    );
    let proxy = TestProxy::start(&text).await.ready().await;
    let reply = get(&proxy.url("/video/graphql")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["error"], "no_route");
    assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(stubs.upstream.requests(), 0);
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the proxy answers")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn connect_and_absolute_form_requests_for_other_hosts_are_refused() {
    let h = harness(StubSettings::default()).await;
    let connect = raw_exchange(
        h.proxy.addr,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    let absolute = raw_exchange(
        h.proxy.addr,
        "GET http://example.com/graphql HTTP/1.1\r\nHost: example.com\r\n\r\n",
    )
    .await;
    assert!(absolute.starts_with("HTTP/1.1 403"), "{absolute}");
    assert!(absolute.contains("not_an_open_proxy"), "{absolute}");
    assert_eq!(h.stubs.upstream.requests(), 0);
}

#[tokio::test]
async fn an_absolute_form_request_for_a_routed_host_is_served() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let text = stubs.config("", "").replace(
        "account = \"main\"",
        "account = \"main\"\nhost = \"media.example\"",
    );
    let proxy = TestProxy::start(&text).await.ready().await;
    let answer = raw_exchange(
        proxy.addr,
        "GET http://media.example/whoami HTTP/1.1\r\nHost: media.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(stubs.upstream.accepted(), 1);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_a_silent_one_a_504() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let closed = {
        let l = std::net::TcpListener::bind(loopback()).unwrap();
        l.local_addr().unwrap()
    };
    let silent = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let text = stubs
        .config("", "")
        .replace("[server]", "[server]\nupstream_timeout = \"300ms\"")
        + &format!(
            r#"
[[routes]]
path_prefix = "/closed"
upstream = "http://{closed}"
account = "main"
[[routes]]
path_prefix = "/silent"
upstream = "http://{silent_addr}"
account = "main"
"#
        );
    let proxy = TestProxy::start(&text).await.ready().await;
    let reply = get(&proxy.url("/closed/x")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"], "upstream_unreachable");
    let reply = get(&proxy.url("/silent/x")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["error"], "upstream_timeout");
    let body = String::from_utf8_lossy(&reply.body).to_string();
    assert!(!body.contains(&silent_addr.to_string()), "{body}");
    drop(silent);
}

#[tokio::test]
async fn the_upstream_answer_passes_through_untouched_including_mosaic_errors() {
    let h = harness(StubSettings::default()).await;
    // A token given in the query as well as the header makes Mosaic answer 400; the proxy
    // removes the query token, so the request succeeds.
    let reply = get(&h.proxy.url("/graphql?access_token=x")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(h.stubs.upstream.accepted(), 1);
    // A method and body of the client's choosing reach the upstream as sent.
    let request = Request::builder()
        .method(Method::PUT)
        .uri(h.proxy.url("/things/echo"))
        .body(
            http_body_util::Full::new(Bytes::from_static(b"{\"query\":\"{ a }\"}"))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let reply = send(&client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"{\"query\":\"{ a }\"}");
    assert_eq!(h.stubs.upstream.last().unwrap().method, Method::PUT);
    assert!(h.stubs.upstream.last().unwrap().verdict.is_ok());
}

#[tokio::test]
async fn shutdown_waits_for_requests_in_flight_only_as_long_as_the_grace_period() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let silent = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let text = stubs
        .config("", "")
        .replace("[server]", "[server]\nshutdown_grace = \"200ms\"\nupstream_timeout = \"30s\"")
        + &format!(
            "[[routes]]\npath_prefix = \"/silent\"\nupstream = \"http://{silent_addr}\"\naccount = \"main\"\n"
        );
    let Stoppable {
        addr,
        trigger,
        running,
    } = start_stoppable(&text).await;
    let url = format!("http://{addr}/silent/x");
    let in_flight = tokio::spawn(async move {
        client()
            .request(Request::get(url).body(empty()).unwrap())
            .await
    });
    // The request is in flight once the silent upstream has its connection.
    let (_held, _) = silent.accept().await.unwrap();
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("shutdown is bounded by the grace period")
        .unwrap();
    in_flight.abort();
}

/// An upstream that speaks only HTTP/2 with prior knowledge, and says what it was sent.
async fn h2c_only_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service =
                hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let text = format!(
                        "{:?} {} {}",
                        request.version(),
                        request.uri().path(),
                        request.headers().contains_key(header::AUTHORIZATION)
                    );
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from(text)),
                    ))
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn a_route_marked_h2c_speaks_http2_with_prior_knowledge_to_its_upstream() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let up = h2c_only_upstream().await;
    let routes = format!(
        "[[routes]]\npath_prefix = \"/h2c\"\nupstream = \"http://{up}\"\naccount = \"main\"\nh2c = true\n\
         [[routes]]\npath_prefix = \"/plain\"\nupstream = \"http://{up}\"\naccount = \"main\"\n"
    );
    let proxy = TestProxy::start(&stubs.config("", &routes))
        .await
        .ready()
        .await;
    let reply = get(&proxy.url("/h2c/x")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"HTTP/2.0 /h2c/x true");
    // Without h2c the proxy speaks HTTP/1.1, which this upstream does not understand.
    let reply = get(&proxy.url("/plain/x")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn further_listeners_serve_their_own_routes_with_their_own_accounts_over_tcp_and_a_unix_socket(
) {
    use std::os::unix::fs::PermissionsExt;
    let mut settings = StubSettings::default();
    settings
        .accounts
        .push(StubAccount::new("second-client", "second-secret"));
    let stubs = Stubs::start(settings).await;
    let dir = std::env::temp_dir().join(format!("map-listeners-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("proxy.sock");
    let rest = format!(
        "[accounts.second]\nclient_id = \"second-client\"\nclient_secret_env = \"SECOND_SECRET\"\n\
         [listeners.app2]\nlisten = \"127.0.0.1:0\"\n\
         [listeners.local]\nsocket = {socket:?}\nsocket_mode = \"0600\"\n\
         [[routes]]\npath_prefix = \"/second\"\nstrip_prefix = true\nupstream = \"http://{up}\"\naccount = \"second\"\nlistener = \"app2\"\n\
         [[routes]]\nupstream = \"http://{up}\"\naccount = \"main\"\nlistener = \"local\"\n",
        socket = socket.display().to_string(),
        up = stubs.upstream_addr,
    );
    let config = mosaic_auth_proxy::Config::parse(&stubs.config("", &rest), &env).unwrap();
    let app = mosaic_auth_proxy::App::bind(config).await.unwrap();
    let main = app.local_addr();
    let listeners = app.listener_addrs();
    let app2 = listeners
        .iter()
        .find(|(n, _)| n == "app2")
        .unwrap()
        .1
        .clone();
    let accounts = app.accounts();
    let (_trigger, signal) = mosaic_auth_proxy::shutdown::channel();
    tokio::spawn(app.run(signal));
    for account in accounts.iter() {
        account
            .header_or_wait(Duration::from_secs(5))
            .await
            .unwrap();
    }
    let name = |reply: Reply| reply.json()["data"]["whoami"]["name"].clone();

    assert_eq!(
        name(get(&format!("http://{main}/whoami")).await),
        "demo-client (stand-in)"
    );
    assert_eq!(
        name(get(&format!("http://{app2}/second/whoami")).await),
        "second-client (stand-in)"
    );
    assert_eq!(
        get(&format!("http://{app2}/whoami")).await.status,
        StatusCode::NOT_FOUND
    );

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let reply = get_over_unix(&socket, "/whoami").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["data"]["whoami"]["name"],
        "demo-client (stand-in)"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// An upstream that answers the first request on each connection `200 ok` and closes the
/// connection under any later one, unanswered, as an upstream does whose idle close crossed
/// the request. Returns its address, and the connections and requests it has seen.
async fn closing_under_the_second_request() -> (std::net::SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>)
{
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, requests) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counts = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counts.0.fetch_add(1, SeqCst);
            let requests = counts.1.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0; 4096];
                for answered in [true, false] {
                    // A head, and as many body bytes as it announces.
                    let head_end = loop {
                        if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&seen[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |n| n.trim().parse().unwrap());
                    while seen.len() < head_end + length {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.drain(..head_end + length);
                    requests.fetch_add(1, SeqCst);
                    if answered {
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
                // Closed under the second request, unanswered.
            });
        }
    });
    (addr, connections, requests)
}

#[tokio::test]
async fn an_idempotent_request_the_upstream_closed_a_reused_connection_under_is_sent_once_more() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let (up, connections, requests) = closing_under_the_second_request().await;
    let routes = format!(
        "[[routes]]\npath_prefix = \"/flaky\"\nupstream = \"http://{up}\"\naccount = \"main\"\n\
         [[routes]]\npath_prefix = \"/unkept\"\nupstream = \"http://{up}\"\naccount = \"main\"\nreplay = false\n"
    );
    // One worker: each worker reuses only the upstream connections it opened.
    let proxy = TestProxy::start(&stubs.config_with_server("workers = 1", "", &routes))
        .await
        .ready()
        .await;
    let with_body = |method: Method, path: &str| {
        let body = http_body_util::Full::new(Bytes::from_static(b"{\"a\":1}"))
            .map_err(|never| match never {})
            .boxed();
        Request::builder()
            .method(method)
            .uri(proxy.url(path))
            .body(body)
            .unwrap()
    };
    let counts = || (connections.load(SeqCst), requests.load(SeqCst));

    assert_eq!(get(&proxy.url("/flaky/a")).await.status, StatusCode::OK);
    assert_eq!(counts(), (1, 1));
    // Sent on the kept connection, which the upstream closes under it: sent once more.
    assert_eq!(get(&proxy.url("/flaky/b")).await.status, StatusCode::OK);
    assert_eq!(counts(), (2, 3));
    // An idempotent request with a kept body goes again with its body.
    let reply = send(&client(), with_body(Method::PUT, "/flaky/c")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(counts(), (3, 5));

    // A POST may have been acted on: its failure stands.
    let reply = send(&client(), with_body(Method::POST, "/flaky/d")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"], "upstream_failed");
    assert_eq!(counts(), (3, 6));
    // So does a request of which nothing was kept (the route keeps no replay).
    assert_eq!(get(&proxy.url("/unkept/e")).await.status, StatusCode::OK);
    assert_eq!(counts(), (4, 7));
    let reply = get(&proxy.url("/unkept/f")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(counts(), (4, 8));

    let metrics = get(&format!("http://{}/metrics", proxy.admin)).await.body;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("mosaic_auth_proxy_upstream_resent_total{route=\"*/flaky\"} 2"),
        "{metrics}"
    );
}
