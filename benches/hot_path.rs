//! Criterion benchmarks of the request path: the token read, the header rewrite, and whole
//! round trips through the proxy on loopback, against a direct round trip as the baseline.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mosaic_auth_proxy::config::ForwardingHeaders;
use mosaic_auth_proxy::identity::refresh::RefreshPolicy;
use mosaic_auth_proxy::identity::{Account, Grant, Token};
use mosaic_auth_proxy::proxy::headers::{remove_hop_by_hop, ClientAddress};
use mosaic_auth_proxy::proxy::replay::KeptHeaders;
use mosaic_auth_proxy::secret::Secret;
use mosaic_auth_proxy::server::deadline::KeptTimers;
use mosaic_auth_proxy::shutdown::{self, Shutdown};
use mosaic_auth_proxy::stub::{IdentityStub, SigningKey, StubSettings};
use mosaic_auth_proxy::{App, Config};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

const JWT: &str =
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.c2lnbmF0dXJl";

fn account_with_token() -> Account {
    let grant = Grant {
        access_token: Secret::new(JWT),
        lifetime: Duration::from_secs(3600),
        sent_at: tokio::time::Instant::now(),
    };
    Account::with_token(
        "bench",
        Token::new(grant, &RefreshPolicy::default(), 0.0).unwrap(),
    )
}

fn typical_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "proxy.internal:8080"),
        ("user-agent", "legacy-app/1.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("connection", "keep-alive"),
        ("authorization", "Bearer stale-client-token"),
        ("x-request-id", "5b1f0f7e-3f5e-4c1e-9d6a-5d8f1b0c2a11"),
    ] {
        h.insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    h
}

/// What the profile showed to matter beyond the rewrite: headers without hop-by-hop ones
/// (most requests over HTTP/1.1 keep-alive and every h2 request; one pass, no lookups), and
/// the copy of a request head kept for a replay.
fn profile_hot_spots(c: &mut Criterion) {
    let mut plain = typical_headers();
    plain.remove(header::CONNECTION);
    c.bench_function("hot_path/remove_hop_by_hop_absent", |b| {
        b.iter_batched_ref(
            || plain.clone(),
            remove_hop_by_hop,
            criterion::BatchSize::SmallInput,
        )
    });
    // A client that closes after each request (`Connection: close`).
    let mut closing = plain.clone();
    closing.insert(header::CONNECTION, HeaderValue::from_static("close"));
    c.bench_function("hot_path/remove_hop_by_hop_connection_close", |b| {
        b.iter_batched_ref(
            || closing.clone(),
            remove_hop_by_hop,
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("hot_path/client_address", |b| {
        let ip: std::net::IpAddr = "192.0.2.117".parse().unwrap();
        b.iter(|| ClientAddress::new(ip, &[]))
    });
    // The first request of a new connection: its map as large as its two headers (what a
    // client closing after each request sends), so each added header could grow it.
    let host = HeaderValue::from_static("proxy.internal:8080");
    let client = ClientAddress::new("192.0.2.117".parse().unwrap(), &[]);
    c.bench_function("hot_path/forwarding_headers_new_connection", |b| {
        b.iter_batched(
            || {
                let mut fresh = HeaderMap::with_capacity(2);
                fresh.insert(header::HOST, host.clone());
                fresh.insert(header::CONNECTION, HeaderValue::from_static("close"));
                fresh
            },
            |mut headers| {
                client.set_forwarding_headers(
                    &mut headers,
                    Some(host.clone()),
                    ForwardingHeaders::ALL,
                );
                headers.insert(header::AUTHORIZATION, host.clone());
                headers
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // The head kept for a replay, its values sharing one buffer as hyper parses them: kept
    // as a map clone (what the proxy did) and as the one buffer it keeps now.
    let parsed = shared_values(&plain);
    c.bench_function("hot_path/replay_head_map_clone", |b| {
        b.iter(|| parsed.clone())
    });
    c.bench_function("hot_path/replay_head_kept", |b| {
        b.iter(|| KeptHeaders::new(&parsed))
    });
    upstream_deadline(c);
}

/// `headers` with every value a slice of one shared buffer, as hyper hands a parsed head over.
fn shared_values(headers: &HeaderMap) -> HeaderMap {
    let mut whole = Vec::new();
    for value in headers.values() {
        whole.extend_from_slice(value.as_bytes());
    }
    let whole = Bytes::from(whole);
    let mut at = 0;
    let mut parsed = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let slice = whole.slice(at..at + value.len());
        at += value.len();
        parsed.append(name.clone(), HeaderValue::from_maybe_shared(slice).unwrap());
    }
    parsed
}

/// The bound on a request's wait for its answer: a fresh `tokio::time::timeout`, which goes
/// into the timer wheel and out again, against a kept timer set anew. The future waited for
/// is pending once (as an exchange is before its answer), so that the timer is armed.
fn upstream_deadline(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wait = Duration::from_secs(60);
    c.bench_function("hot_path/upstream_deadline_fresh_timeout", |b| {
        b.iter(|| {
            runtime.block_on(async { tokio::time::timeout(wait, Box::pin(pending_once())).await })
        })
    });
    let kept = KeptTimers::default();
    c.bench_function("hot_path/upstream_deadline_kept_timer", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let deadline = tokio::time::Instant::now() + wait;
                kept.within(deadline, Box::pin(pending_once())).await
            })
        })
    });
}

/// Pending at its first poll, ready at its second.
async fn pending_once() {
    tokio::task::yield_now().await;
}

fn token_and_rewrite(c: &mut Criterion) {
    let account = account_with_token();
    c.bench_function("hot_path/usable_header", |b| {
        b.iter(|| account.usable_header().expect("a token is cached"))
    });
    let template = typical_headers();
    let client = ClientAddress::new("127.0.0.1".parse().unwrap(), &[]);
    let host = HeaderValue::from_static("127.0.0.1:8080");
    c.bench_function("hot_path/rewrite_request_headers", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |headers| {
                remove_hop_by_hop(headers);
                headers.remove(header::HOST);
                headers.remove(header::AUTHORIZATION);
                client.set_forwarding_headers(headers, Some(host.clone()), ForwardingHeaders::ALL);
                headers.insert(header::AUTHORIZATION, account.usable_header().unwrap());
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// A minimal upstream, so the round trip measures the proxy and not the stand-in's RSA check.
/// Paths under `/graphql` answer a small GraphQL JSON reply (which the proxy inspects for a
/// token rejection); others answer 1 KiB of `application/octet-stream` (which it does not).
async fn plain_upstream(signal: Shutdown) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bytes = Bytes::from(vec![b'x'; 1024]);
    let graphql = Bytes::from(format!(
        "{{\"data\":{{\"media\":{{\"title\":\"{}\"}}}}}}",
        "t".repeat(1000)
    ));
    tokio::spawn(mosaic_auth_proxy::server::serve(
        listener,
        move |_| {
            let (bytes, graphql) = (bytes.clone(), graphql.clone());
            hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let json = request.uri().path().starts_with("/graphql");
                let (body, content_type) = if json {
                    (graphql.clone(), "application/json")
                } else {
                    (bytes.clone(), "application/octet-stream")
                };
                async move {
                    // Drain the request so the connection stays reusable.
                    let _ = request.into_body().collect().await;
                    let mut response = Response::new(Full::new(body));
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                    Ok::<_, Infallible>(response)
                }
            })
        },
        Default::default(),
        None,
        None,
        signal,
        Duration::from_secs(1),
    ));
    addr
}

fn round_trips(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_trigger, signal) = shutdown::channel();
    let (proxy_addr, upstream_addr) = rt.block_on(async {
        let stub = IdentityStub::bind(
            "127.0.0.1:0".parse().unwrap(),
            StubSettings::default(),
            SigningKey::bundled(),
        )
        .await
        .unwrap();
        let origin = stub.handle().origin().to_owned();
        tokio::spawn(stub.run(signal.clone()));
        let upstream = plain_upstream(signal.clone()).await;
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[identity]\norigin = \"{origin}\"\n\
             [accounts.a]\nclient_id = \"demo-client\"\nclient_secret_env = \"S\"\n\
             [[routes]]\nupstream = \"http://{upstream}\"\naccount = \"a\"\n\
             [[routes]]\npath_prefix = \"/no-replay\"\nupstream = \"http://{upstream}\"\naccount = \"a\"\nreplay = false\n"
        );
        let config = Config::parse(&text, &|_| Some("demo-secret".into())).unwrap();
        let app = App::bind(config).await.unwrap();
        let addr = app.local_addr();
        let accounts = app.accounts();
        tokio::spawn(app.run(signal.clone()));
        accounts[0]
            .header_or_wait(Duration::from_secs(5))
            .await
            .unwrap();
        (addr, upstream)
    });
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut group = c.benchmark_group("round_trip");
    group.throughput(Throughput::Elements(1));
    for (name, addr, path) in [
        ("direct_h1_keepalive_1kb", upstream_addr, "/bytes"),
        ("forward_h1_keepalive_1kb", proxy_addr, "/bytes"),
        (
            "forward_h1_keepalive_1kb_no_replay",
            proxy_addr,
            "/no-replay/bytes",
        ),
        ("direct_h1_keepalive_graphql_1kb", upstream_addr, "/graphql"),
        (
            "forward_h1_keepalive_graphql_1kb_inspected",
            proxy_addr,
            "/graphql",
        ),
    ] {
        let uri: http::Uri = format!("http://{addr}{path}").parse().unwrap();
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let response = client.get(uri.clone()).await.unwrap();
                assert!(response.status().is_success());
                response.into_body().collect().await.unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, token_and_rewrite, profile_hot_spots, round_trips);
criterion_main!(benches);
