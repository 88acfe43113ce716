//! Operating the proxy: `/metrics` parsed and followed through traffic, a refresh, a rejection
//! with replay and upstream failures; readiness; the status data; a reload under traffic.

use crate::support::*;
use http::{header, Request, StatusCode};
use mosaic_auth_proxy::stub::{Fault, StubSettings};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// One scrape: each series (name and sorted labels) and its value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    async fn take(admin: std::net::SocketAddr) -> Scrape {
        let reply = get(&format!("http://{admin}/metrics")).await;
        assert_eq!(reply.status, StatusCode::OK);
        let content_type = reply.headers[header::CONTENT_TYPE].to_str().unwrap();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Scrape::parse(std::str::from_utf8(&reply.body).unwrap())
    }

    /// Parses the Prometheus text format: `name{a="x",b="y"} value` lines, comments skipped.
    fn parse(text: &str) -> Scrape {
        let mut series = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match key.split_once('{') {
                Some((name, rest)) => {
                    let labels: BTreeMap<&str, &str> = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("label=value");
                            (k, v.trim_matches('"'))
                        })
                        .collect();
                    (name, labels)
                }
                None => (key, BTreeMap::new()),
            };
            assert!(
                series.insert(Scrape::key(name, &labels), value).is_none(),
                "the series {key} appears twice"
            );
        }
        Scrape(series)
    }

    fn key(name: &str, labels: &BTreeMap<&str, &str>) -> String {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{name}{{{}}}", labels.join(","))
    }

    /// The value of a series, 0 when it is absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.0
            .get(&Scrape::key(name, &labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.0.contains_key(&Scrape::key(name, &labels))
    }
}

const P: &str = "mosaic_auth_proxy_";

#[tokio::test]
async fn metrics_follow_traffic_a_refresh_a_rejection_with_replay_and_upstream_failures() {
    let stubs = Stubs::start(StubSettings::default()).await;
    // A second route to a port where nothing listens.
    let closed = std::net::TcpListener::bind(loopback()).unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let config = stubs.config(
        "",
        &format!("[[routes]]\npath_prefix = \"/dead\"\nupstream = \"http://{dead}\"\naccount = \"main\"\n"),
    );
    let proxy = TestProxy::start(&config).await.ready().await;
    let route = [("route", "*/")];
    let ok = [("route", "*/"), ("status", "200")];
    let account = [("account", "main")];

    let before = Scrape::take(proxy.admin).await;
    assert_eq!(
        before.get(
            &format!("{P}token_requests_total"),
            &[("account", "main"), ("outcome", "ok")]
        ),
        1.0
    );
    assert!(before.has(
        &format!("{P}token_requests_total"),
        &[("account", "main"), ("outcome", "permanent")]
    ));
    let expiry = before.get(&format!("{P}token_expiry_seconds"), &account);
    assert!(expiry > 3000.0 && expiry <= 3600.0, "expiry {expiry}");
    let refreshed = before.get(
        &format!("{P}token_last_refresh_timestamp_seconds"),
        &account,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - refreshed).abs() < 30.0,
        "last refresh {refreshed}, now {now}"
    );
    assert_eq!(before.get(&format!("{P}breaker_open"), &account), 0.0);
    assert!(before.has(&format!("{P}breaker_open"), &account));

    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    }
    assert_eq!(
        get(&proxy.url("/dead/x")).await.status,
        StatusCode::BAD_GATEWAY
    );
    let client = client();
    let unrouted = Request::get(proxy.url("/x"))
        .header(header::HOST, "")
        .body(empty())
        .unwrap();
    assert_eq!(
        send(&client, unrouted).await.status,
        StatusCode::BAD_REQUEST
    );

    // A rejection: the token is refused once, refreshed, and the request replayed.
    let token = stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone();
    stubs.upstream.revoke(token);
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);

    let settled = eventually(Duration::from_secs(5), async || {
        Scrape::take(proxy.admin)
            .await
            .get(&format!("{P}requests_in_flight"), &[])
            == 0.0
    })
    .await;
    assert!(settled, "requests stayed in flight");
    let after = Scrape::take(proxy.admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        let name = format!("{P}{name}");
        after.get(&name, labels) - before.get(&name, labels)
    };
    assert_eq!(delta("requests_total", &ok), 6.0);
    assert_eq!(delta("request_duration_seconds_count", &route), 6.0);
    assert_eq!(
        delta(
            "request_duration_seconds_bucket",
            &[("route", "*/"), ("le", "+Inf")]
        ),
        6.0
    );
    assert!(delta("request_duration_seconds_sum", &route) > 0.0);
    // Seven answer heads from the upstream: five, the refused one and its replay.
    assert_eq!(delta("upstream_duration_seconds_count", &route), 7.0);
    assert_eq!(
        delta("requests_total", &[("route", "*/dead"), ("status", "502")]),
        1.0
    );
    assert_eq!(
        delta(
            "upstream_errors_total",
            &[("route", "*/dead"), ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "upstream_errors_total",
            &[("route", "*/dead"), ("kind", "timeout")]
        ),
        0.0
    );
    assert_eq!(
        delta("requests_total", &[("route", "(none)"), ("status", "400")]),
        1.0
    );
    assert_eq!(
        delta(
            "token_requests_total",
            &[("account", "main"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "token_rejections_total",
            &[("account", "main"), ("code", "ACCESS_TOKEN_EXPIRED")]
        ),
        1.0
    );
    assert_eq!(
        delta("replays_total", &[("account", "main"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        delta(
            "replays_total",
            &[("account", "main"), ("outcome", "not_kept")]
        ),
        0.0
    );
    assert!(
        after.get(&format!("{P}client_connections"), &[]) >= 1.0,
        "the scrape's own connection is not counted"
    );
    assert!(
        after.get(
            &format!("{P}token_last_refresh_timestamp_seconds"),
            &account
        ) >= refreshed,
    );
}

#[tokio::test]
async fn readiness_follows_token_state_and_never_shows_a_token() {
    let stubs = Stubs::start(StubSettings::default()).await;
    stubs.identity.set_fault(Some(Fault::Http500));
    let proxy = TestProxy::start(&stubs.config("", "")).await;
    let admin = format!("http://{}", proxy.admin);
    assert_eq!(get(&format!("{admin}/livez")).await.status, StatusCode::OK);
    let failing = eventually(Duration::from_secs(5), async || {
        let reply = get(&format!("{admin}/readyz")).await;
        reply.status == StatusCode::SERVICE_UNAVAILABLE
            && reply.json()["accounts"][0]["state"] == "failing"
    })
    .await;
    assert!(failing, "readiness never reported the failing account");
    let reply = get(&format!("{admin}/readyz")).await;
    assert!(reply.json()["accounts"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("500"));
    assert!(reply.json()["accounts"][0]["fingerprint"].is_null());

    stubs.identity.set_fault(None);
    let ready = eventually(Duration::from_secs(5), async || {
        get(&format!("{admin}/readyz")).await.status == StatusCode::OK
    })
    .await;
    assert!(ready, "the proxy never became ready");
    assert_eq!(get(&proxy.url("/whoami")).await.status, StatusCode::OK);
    let sent = stubs.upstream.last().unwrap().headers[header::AUTHORIZATION].clone();
    let jwt = sent
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    let reply = get(&format!("{admin}/readyz")).await;
    let account = &reply.json()["accounts"][0];
    assert_eq!(account["state"], "ready");
    assert_eq!(account["fingerprint"].as_str().unwrap().len(), 8);
    assert!(account["expires_in_s"].as_f64().unwrap() > 3000.0);
    // The token, or any of its three parts, appears on no admin page.
    for path in ["/readyz", "/status.json", "/metrics", "/"] {
        let body = get(&format!("{admin}{path}")).await.body;
        let text = String::from_utf8_lossy(&body);
        for part in jwt.split('.') {
            assert!(!text.contains(part), "{path} shows part of the token");
        }
    }
    // The older names still answer.
    assert_eq!(get(&format!("{admin}/ready")).await.status, StatusCode::OK);
    assert_eq!(get(&format!("{admin}/health")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_status_data_names_accounts_routes_and_recent_events() {
    let h = harness(StubSettings::default()).await;
    let reply = get(&format!("http://{}/status.json", h.proxy.admin)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let status = reply.json();
    let account = &status["accounts"][0];
    assert_eq!(account["account"], "main");
    assert_eq!(account["state"], "ready");
    assert!(account["expires_at_ms"].as_u64().unwrap() > status["now_ms"].as_u64().unwrap());
    assert!(
        account["next_refresh_at_ms"].as_u64().unwrap()
            < account["expires_at_ms"].as_u64().unwrap()
    );
    assert_eq!(status["routes"][0]["route"], "*/");
    assert_eq!(status["routes"][0]["account"], "main");
    assert_eq!(status["routes"][0]["listener"], "main");
    assert_eq!(status["events"][0]["kind"], "refresh");
    assert_eq!(status["events"][0]["detail"], account["fingerprint"]);
    let page = get(&format!("http://{}/", h.proxy.admin)).await;
    assert!(page.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page.body).contains("status.json"));
    let refused = send(
        &client(),
        Request::get(format!("http://{}/reload", h.proxy.admin))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);
}

/// A configuration file for the reload tests: the main account and its route `/stays`
/// always, `server` added to `[server]`, and `extra` after the route (its keys, further
/// routes and accounts).
fn reload_config(
    stubs: &Stubs,
    secret_file: &std::path::Path,
    server: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}

[identity]
origin = "{origin}"
{FAST_IDENTITY}

[accounts.main]
client_id = "demo-client"
client_secret_file = "{secret}"

[[routes]]
path_prefix = "/stays"
upstream = "http://{upstream}"
account = "main"
{extra}
"#,
        origin = stubs.identity.origin(),
        secret = secret_file.display(),
        upstream = stubs.upstream_addr,
    )
}

async fn post_reload(admin: std::net::SocketAddr) -> Reply {
    let request = Request::post(format!("http://{admin}/reload"))
        .body(empty())
        .unwrap();
    send(&client(), request).await
}

#[tokio::test]
async fn a_reload_under_traffic_adds_and_removes_routes_keeps_tokens_and_refuses_a_broken_file() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let dir = tempdir();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let file = dir.join("proxy.toml");
    let route = |prefix: &str, account: &str| {
        format!(
            "[[routes]]\npath_prefix = \"{prefix}\"\nupstream = \"http://{}\"\naccount = \"{account}\"\n",
            stubs.upstream_addr
        )
    };
    let account = |name: &str| {
        format!(
            "[accounts.{name}]\nclient_id = \"demo-client\"\nclient_secret_file = \"{}\"\n",
            secret.display()
        )
    };
    let first = format!("{}{}{}", route("/old", "gone"), account("gone"), "");
    std::fs::write(&file, reload_config(&stubs, &secret, "", &first)).unwrap();
    let proxy = TestProxy::start_file(&file).await.ready().await;
    let main = |proxy: &TestProxy| {
        let accounts = proxy.live.accounts();
        accounts
            .iter()
            .find(|a| a.name() == "main")
            .unwrap()
            .clone()
    };
    let main_before = main(&proxy);
    let gone = proxy
        .live
        .accounts()
        .iter()
        .find(|a| a.name() == "gone")
        .unwrap()
        .clone();
    assert_eq!(get(&proxy.url("/old/whoami")).await.status, StatusCode::OK);
    let traffic = traffic(proxy.url("/stays/whoami"), 4);
    let token_requests = stubs.identity.token_requests();

    // A route added (with a new account), one removed with its account.
    let second = format!("{}{}", route("/new", "fresh"), account("fresh"));
    std::fs::write(&file, reload_config(&stubs, &secret, "", &second)).unwrap();
    let reply = post_reload(proxy.admin).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let report = &reply.json()["report"];
    assert_eq!(report["routes_added"], serde_json::json!(["*/new"]));
    assert_eq!(report["routes_removed"], serde_json::json!(["*/old"]));
    assert_eq!(report["accounts_kept"], serde_json::json!(["main"]));
    assert_eq!(report["accounts_started"], serde_json::json!(["fresh"]));
    assert_eq!(report["accounts_stopped"], serde_json::json!(["gone"]));
    let fresh_ready = eventually(Duration::from_secs(5), async || {
        get(&proxy.url("/new/whoami")).await.status == StatusCode::OK
    })
    .await;
    assert!(fresh_ready, "the added route never served");
    assert_eq!(
        get(&proxy.url("/old/whoami")).await.status,
        StatusCode::NOT_FOUND
    );
    // The kept account kept its token and refresher: the only token request is the new
    // account's first.
    assert!(std::sync::Arc::ptr_eq(&main_before, &main(&proxy)));
    // The removed account's refresher and secret watcher stopped: the account is held only
    // by this test and by the first generation's account list and proxy, which `proxy`
    // kept from the start (before: also the generation in use, the live account list, the
    // refresher's record and its two tasks).
    let released = eventually(Duration::from_secs(5), async || {
        std::sync::Arc::strong_count(&gone) == 3
    })
    .await;
    assert!(
        released,
        "the removed account is still held ({} holders)",
        std::sync::Arc::strong_count(&gone)
    );
    assert_eq!(stubs.identity.token_requests(), token_requests + 1);

    // A broken file is refused with the errors `check` gives; the configuration in use stays.
    std::fs::write(
        &file,
        format!(
            "{}\n[server]\nupstream_timeout = \"soon\"\n",
            reload_config(&stubs, &secret, "", &second).replace("[server]", "[serverr]")
        ),
    )
    .unwrap();
    let refused = post_reload(proxy.admin).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let body = refused.json();
    assert_eq!(body["status"], "refused");
    let keys: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"serverr"), "{body}");
    assert!(keys.contains(&"server.upstream_timeout"), "{body}");
    assert!(body["message"].as_str().unwrap().contains("fix:"));
    assert_eq!(get(&proxy.url("/new/whoami")).await.status, StatusCode::OK);
    let status = get(&format!("http://{}/status.json", proxy.admin))
        .await
        .json();
    assert_eq!(status["last_reload"]["ok"], false);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let (done, failures, sample) = traffic.stop().await;
    assert!(done > 20, "only {done} requests were made");
    assert_eq!(failures, 0, "{failures} of {done} failed: {sample:?}");
    assert_eq!(stubs.identity.token_requests(), token_requests + 1);
}

#[tokio::test]
async fn a_reload_keeps_the_connections_and_the_budget_of_an_upstream_it_does_not_change() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let dir = tempdir();
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let file = dir.join("proxy.toml");
    // One worker: one stack of idle connections. A budget of one connection.
    let config = |max: usize, added: &str| {
        let extra = format!("max_connections = {max}\n{added}");
        reload_config(&stubs, &secret, "workers = 1", &extra)
    };
    std::fs::write(&file, config(1, "")).unwrap();
    let proxy = TestProxy::start_file(&file).await.ready().await;
    let opened = || stubs.upstream.connections().opened();
    assert_eq!(
        get(&proxy.url("/stays/whoami")).await.status,
        StatusCode::OK
    );
    assert_eq!(opened(), 1);

    // A request in flight on the configuration before, holding the budget's one place.
    let slow_url = proxy.url("/stays/slow");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let added = "[[routes]]\npath_prefix = \"/added\"\nupstream = \"http://127.0.0.1:9\"\naccount = \"main\"\n";
    std::fs::write(&file, config(1, added)).unwrap();
    let reply = post_reload(proxy.admin).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    // The request after the reload waits for that place and then takes the same
    // connection: the upstream never sees two.
    let after = get(&proxy.url("/stays/whoami")).await;
    assert_eq!(after.status, StatusCode::OK);
    assert!(slow.is_finished(), "the budget's place was given twice");
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    assert_eq!(opened(), 1, "a connection was opened anew");

    // A changed budget is a new one, with a new pool.
    std::fs::write(&file, config(2, added)).unwrap();
    let reply = post_reload(proxy.admin).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        get(&proxy.url("/stays/whoami")).await.status,
        StatusCode::OK
    );
    assert_eq!(opened(), 2);
}

/// A fresh directory under the target directory, for files a test writes.
pub fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mosaic-auth-proxy-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_failing_identity_service_counts_transient_token_requests() {
    let stubs = Stubs::start(StubSettings::default()).await;
    stubs.identity.set_fault(Some(Fault::Http500));
    let proxy = TestProxy::start(&stubs.config("", "")).await;
    let counted = eventually(Duration::from_secs(5), async || {
        Scrape::take(proxy.admin).await.get(
            &format!("{P}token_requests_total"),
            &[("account", "main"), ("outcome", "transient")],
        ) >= 2.0
    })
    .await;
    assert!(counted, "transient failures were not counted");
}

#[tokio::test]
async fn upstream_errors_are_counted_by_kind() {
    let stubs = Stubs::start(StubSettings::default()).await;
    // TLS spoken to a plain HTTP upstream fails in the handshake; /slow outlasts the timeout.
    let config = stubs.config_with_server(
        "upstream_timeout = \"100ms\"",
        "",
        &format!(
            "[[routes]]\npath_prefix = \"/tls\"\nupstream = \"https://{}\"\naccount = \"main\"\n",
            stubs.upstream_addr
        ),
    );
    let proxy = TestProxy::start(&config).await.ready().await;
    assert_eq!(
        get(&proxy.url("/tls/x")).await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        get(&proxy.url("/slow")).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    let scrape = Scrape::take(proxy.admin).await;
    let errors = |route: &str, kind: &str| {
        scrape.get(
            &format!("{P}upstream_errors_total"),
            &[("route", route), ("kind", kind)],
        )
    };
    assert_eq!(errors("*/tls", "tls"), 1.0);
    assert_eq!(errors("*/tls", "connect"), 0.0);
    assert_eq!(errors("*/", "timeout"), 1.0);
    assert_eq!(
        scrape.get(
            &format!("{P}requests_total"),
            &[("route", "*/"), ("status", "504")]
        ),
        1.0
    );
}
