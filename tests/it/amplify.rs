//! A client cannot multiply the work it causes upstream: cancelled forwarded streams are
//! budgeted per connection, abandoned answers keep their pooled connections, and each
//! upstream has a budget of connections. Pooled connections are reused only while the
//! upstream keeps them.

use crate::support::*;
use http::{Request, StatusCode};
use mosaic_auth_proxy::stub::{MosaicUpstream, StubSettings};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_paced_rapid_reset_gets_goaway_enhance_your_calm_and_costs_the_upstream_little() {
    let stubs = Stubs::start(StubSettings::default()).await;
    // The ordinary client's requests go to an upstream of their own, so that the stand-in's
    // counts are the attacker's alone.
    let (_trigger, signal) = mosaic_auth_proxy::shutdown::channel();
    let other = MosaicUpstream::bind(loopback(), stubs.identity.origin())
        .await
        .unwrap();
    let other_route = format!(
        "[[routes]]\npath_prefix = \"/ordinary\"\nstrip_prefix = true\nupstream = \"http://{}\"\naccount = \"main\"\n",
        other.local_addr()
    );
    tokio::spawn(other.run(signal));
    let server = "max_cancelled_streams = 20\ncancelled_streams_window = \"10s\"";
    let proxy = TestProxy::start(&stubs.config_with_server(server, "", &other_route))
        .await
        .ready()
        .await;

    // An ordinary client on its own connection, served throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ordinary = {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        let url = proxy.url("/ordinary/whoami");
        tokio::spawn(async move {
            let client = h2_client();
            for _ in 0..10_000 {
                if stop.load(SeqCst) {
                    break;
                }
                let reply = send(&client, Request::get(&url).body(empty()).unwrap()).await;
                let counter = if reply.status == StatusCode::OK {
                    &served
                } else {
                    &failed
                };
                counter.fetch_add(1, SeqCst);
            }
        })
    };

    // The attacker: HEADERS, wait until the proxy forwarded them, RST_STREAM, again.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut goaway = None;
    for _round in 0..10 {
        let before = stubs.upstream.requests();
        let mut streams = Vec::new();
        for _ in 0..10 {
            let request = Request::get(proxy.url("/slow")).body(()).unwrap();
            let Ok(ready) = h2.clone().ready().await else {
                break;
            };
            h2 = ready;
            match h2.send_request(request, true) {
                Ok((response, stream)) => streams.push((response, stream)),
                Err(_) => break,
            }
        }
        let forwarded = eventually(PATIENCE, async || {
            stubs.upstream.requests() >= before + streams.len() as u64 || connection.is_finished()
        })
        .await;
        assert!(forwarded);
        for (_, mut stream) in streams {
            stream.send_reset(h2::Reason::CANCEL);
        }
        if connection.is_finished() {
            goaway = Some(connection.await.unwrap());
            break;
        }
        let ended = tokio::time::timeout(Duration::from_millis(200), async {
            while !connection.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if ended.is_ok() {
            goaway = Some(connection.await.unwrap());
            break;
        }
    }
    let error = goaway
        .expect("the connection was ended")
        .expect_err("it ended with a GOAWAY error code");
    assert!(error.is_go_away() && error.is_remote(), "{error:?}");
    assert_eq!(
        error.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{error:?}"
    );
    // 21 cancellations cross the budget; at most the round in flight is forwarded too.
    let forwarded = stubs.upstream.requests();
    assert!(forwarded <= 30, "{forwarded} requests reached the upstream");
    assert!(stubs.upstream.connections().opened() <= forwarded);

    stop.store(true, SeqCst);
    ordinary.await.unwrap();
    assert!(served.load(SeqCst) > 0);
    assert_eq!(failed.load(SeqCst), 0, "the ordinary client was refused");
}

#[tokio::test]
async fn a_cancelled_request_whose_small_answer_is_drained_leaves_its_connection_pooled() {
    let h = harness(StubSettings::default()).await;
    let budget = &h.proxy.proxy.routes().routes()[0].budget;
    for i in 0..10 {
        // The client asks, and goes away while the upstream is still working on it.
        let mut tcp = TcpStream::connect(h.proxy.addr).await.unwrap();
        tcp.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let forwarded = eventually(PATIENCE, async || h.stubs.upstream.requests() == i + 1).await;
        assert!(forwarded);
        drop(tcp);
        // The answer is awaited and read in the background, then its place is free.
        let drained = eventually(PATIENCE, async || {
            h.stubs.upstream.accepted() == i + 1 && budget.free_requests() == budget.max()
        })
        .await;
        assert!(drained, "the abandoned answer was not drained");
    }
    assert_eq!(
        h.stubs.upstream.connections().open(),
        h.stubs.upstream.connections().opened()
    );
    let opened = h.stubs.upstream.connections().opened();
    assert!(
        opened <= 2,
        "{opened} upstream connections for 10 abandoned requests"
    );
}

#[tokio::test]
async fn an_upstream_budget_bounds_connections_and_the_rest_wait_or_get_503() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = TestProxy::start(&stubs.config_with_server(
        "upstream_timeout = \"2s\"",
        "",
        "max_connections = 50",
    ))
    .await
    .ready()
    .await;
    let most_open = Arc::new(AtomicU64::new(0));
    let watching = {
        let (most_open, connections) = (most_open.clone(), stubs.upstream.clone());
        tokio::spawn(async move {
            loop {
                most_open.fetch_max(connections.connections().open(), SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut requests = tokio::task::JoinSet::new();
    let clients: Vec<_> = (0..10).map(|_| h2_client()).collect();
    for i in 0..1000 {
        let client = clients[i % clients.len()].clone();
        let url = proxy.url("/slow");
        requests
            .spawn(async move { send(&client, Request::get(url).body(empty()).unwrap()).await });
    }
    let (mut ok, mut busy) = (0, 0);
    while let Some(reply) = requests.join_next().await {
        let reply = reply.unwrap();
        match reply.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.json()["error"], "upstream_busy");
                assert_eq!(reply.headers["retry-after"], "1");
                busy += 1;
            }
            other => panic!("{other}: {:?}", reply.body),
        }
    }
    watching.abort();
    assert_eq!(ok + busy, 1000);
    assert!(ok >= 50, "{ok} served");
    assert!(busy > 0, "the budget never made anyone wait long enough");
    let most = most_open.load(SeqCst);
    assert!(most <= 50, "{most} upstream connections were open at once");
    let opened = stubs.upstream.connections().opened();
    assert!(opened <= 50, "{opened} upstream connections were opened");
}

#[tokio::test]
async fn an_idle_upstream_connection_is_reused_only_while_the_upstream_keeps_it() {
    // The upstream keeps an idle connection for 2 s and says so, as a Node service says 5 s.
    let stubs = Stubs::start_keeping(StubSettings::default(), 2).await;
    // One worker: each worker reuses only the upstream connections it opened.
    let config = stubs.config_with_server("workers = 1", "", "");
    let proxy = TestProxy::start(&config).await.ready().await;
    let connections = stubs.upstream.connections();
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    assert_eq!(connections.opened(), 1, "not reused within its time");

    // From a second before the upstream would close it, it is not reused but closed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(connections.open(), 1, "the upstream closed it already");
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    assert_eq!(
        connections.opened(),
        2,
        "reused as the upstream may be closing it"
    );
    let closed = eventually(PATIENCE, async || connections.open() == 1).await;
    assert!(closed, "the connection passed over was not closed");
}

#[tokio::test]
async fn server_upstream_idle_timeout_bounds_the_reuse_of_an_idle_connection() {
    let stubs = Stubs::start(StubSettings::default()).await;
    // One worker: each worker reuses only the upstream connections it opened.
    let server = "upstream_idle_timeout = \"200ms\"\nworkers = 1";
    let config = stubs.config_with_server(server, "", "");
    let proxy = TestProxy::start(&config).await.ready().await;
    let connections = stubs.upstream.connections();
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    assert_eq!(connections.opened(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    assert_eq!(connections.opened(), 2);
}
