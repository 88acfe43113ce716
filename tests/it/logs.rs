//! Neither the client secret nor a token ever reaches a log line, at any level.

use crate::support::*;
use http::header;
use mosaic_auth_proxy::mosaic::ErrorCode;
use mosaic_auth_proxy::stub::{Fault, StubSettings};
use std::time::Duration;

/// The stand-ins and a proxy with `server.access_log`, ready.
async fn access_logged() -> Harness {
    let stubs = Stubs::start(StubSettings::default()).await;
    let proxy = TestProxy::start(&stubs.config_with_server("access_log = true", "", ""))
        .await
        .ready()
        .await;
    Harness { stubs, proxy }
}

/// Installs `subscriber` as this thread's default, with a second subscriber registered
/// beside it for as long as the capture lasts. With one registered, tracing takes a
/// callsite's interest from the default of the thread that reaches it first, and a sibling
/// test's thread, which has none, would switch that log line off for every thread
/// (tokio-rs/tracing#3611); with two, it asks both.
fn capture_on_this_thread(
    subscriber: impl tracing::Subscriber + Send + Sync + 'static,
) -> (tracing::subscriber::DefaultGuard, tracing::Dispatch) {
    let beside = tracing::Dispatch::new(tracing_subscriber::registry());
    (tracing::subscriber::set_default(subscriber), beside)
}

// A current-thread runtime keeps every task on the thread whose subscriber captures them.
#[tokio::test(flavor = "current_thread")]
async fn no_secret_and_no_token_is_ever_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    // Crates that log through `log` (reqwest, rustls) reach the subscriber as the binary's do.
    let _ = tracing_log::LogTracer::init();
    let subscriber = tracing_subscriber::fmt()
        // Every crate at trace: hyper-util, h2, reqwest, rustls included (hyper logs nothing
        // unless built with its unstable tracing).
        .with_env_filter("trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _capture = capture_on_this_thread(subscriber);

    let h = access_logged().await;
    let mut tokens = Vec::new();
    let h2 = http::Request::get(h.proxy.url("/whoami"))
        .body(empty())
        .unwrap();
    send(&h2_client(), h2).await;
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
    for crate_name in ["hyper_util", "reqwest", "h2"] {
        assert!(
            text.contains(&format!("TRACE {crate_name}"))
                || text.contains(&format!("DEBUG {crate_name}")),
            "{crate_name}'s lines were not captured"
        );
    }
    assert!(text.contains("access: request"), "no access log line");
    assert!(!text.contains(SECRET), "the client secret was logged");
    for token in tokens {
        let jwt = token.to_str().unwrap().trim_start_matches("Bearer ");
        let signature = jwt.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "a token was logged");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_access_log_writes_one_json_line_per_request() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_env_filter("access=info")
        .with_writer(move || writer.clone())
        .finish();
    let _capture = capture_on_this_thread(subscriber);
    let Harness { stubs, proxy } = access_logged().await;
    get(&proxy.url("/whoami?secret=not-logged")).await;
    get(&proxy.url("/nowhere/../..")).await;
    let sent = stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone();
    let jwt = sent.to_str().unwrap().trim_start_matches("Bearer ");
    let fingerprint = mosaic_auth_proxy::secret::fingerprint(jwt);
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let first = &lines[0]["fields"];
    assert_eq!(first["route"], "*/");
    assert_eq!(first["http.method"], "GET");
    assert_eq!(first["path"], "/whoami");
    assert_eq!(first["status"], 200);
    assert_eq!(first["token"], fingerprint.as_str());
    assert_eq!(first["upstream"], format!("http://{}", stubs.upstream_addr));
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    let second = &lines[1]["fields"];
    assert_eq!(second["status"], 400);
    assert_eq!(second["token"], "-");
    assert!(!text.contains("not-logged"), "the query was logged");
}

// The test's thread is the proxy's control thread here; the workers log to its subscriber.
#[tokio::test(flavor = "current_thread")]
async fn further_listeners_are_served_by_the_workers_not_by_the_control_thread() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("access=info")
        .with_ansi(false)
        .with_thread_names(true)
        .with_writer(move || writer.clone())
        .finish();
    let _capture = capture_on_this_thread(subscriber);

    let stubs = Stubs::start(StubSettings::default()).await;
    let dir = crate::operations::tempdir();
    let socket = dir.join("proxy.sock");
    let rest = format!(
        "[listeners.app2]\nlisten = \"127.0.0.1:0\"\n\
         [listeners.local]\nsocket = {socket:?}\n\
         [[routes]]\npath_prefix = \"/second\"\nupstream = \"http://{up}\"\naccount = \"main\"\nlistener = \"app2\"\n\
         [[routes]]\npath_prefix = \"/local\"\nupstream = \"http://{up}\"\naccount = \"main\"\nlistener = \"local\"\n",
        socket = socket.display().to_string(),
        up = stubs.upstream_addr,
    );
    let config = stubs.config_with_server("access_log = true\nworkers = 2", "", &rest);
    let proxy = TestProxy::start(&config).await.ready().await;
    let app2 = &proxy.listeners.iter().find(|(n, _)| n == "app2").unwrap().1;
    assert_eq!(
        get(&format!("http://{app2}/second/whoami")).await.status,
        http::StatusCode::OK
    );
    assert_eq!(
        get_over_unix(&socket, "/local/whoami").await.status,
        http::StatusCode::OK
    );

    // The access line is written when the answer is done: wait for both.
    let lines = || {
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter(|l| l.contains("/second/whoami") || l.contains("/local/whoami"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let logged = eventually(Duration::from_secs(5), async || lines().len() == 2).await;
    assert!(logged, "{:?}", lines());
    for line in lines() {
        assert!(line.contains(" worker-"), "served off the workers: {line}");
    }
}
