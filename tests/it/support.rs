//! The test harness: the identity stand-in, a Mosaic stand-in and the proxy, in process, on
//! port 0, stopped when the harness is dropped.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mosaic_auth_proxy::identity::Account;
use mosaic_auth_proxy::shutdown::{self, ShutdownTrigger};
use mosaic_auth_proxy::stub::{
    IdentityStub, MosaicUpstream, SigningKey, StubHandle, StubSettings, UpstreamHandle,
    NODE_KEEP_ALIVE,
};
use mosaic_auth_proxy::{App, Config};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use mosaic_auth_proxy::BoxError;
pub type TestBody = BoxBody<Bytes, BoxError>;

/// The secret of the stand-in's default account, given to the proxy through `env`.
pub const SECRET: &str = "demo-secret";

pub fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// Looks up the variables the test configurations name.
pub fn env(name: &str) -> Option<String> {
    match name {
        "CLIENT_SECRET" => Some(SECRET.into()),
        "SECOND_SECRET" => Some("second-secret".into()),
        "MARKER" => Some("let-me-in".into()),
        _ => None,
    }
}

/// Identity settings that make tests fast: short retry delays.
pub const FAST_IDENTITY: &str = r#"
retry_initial = "50ms"
retry_max = "200ms"
permanent_retry = "300ms"
"#;

/// The stand-ins, started before the proxy so its configuration can name them.
pub struct Stubs {
    pub identity: StubHandle,
    pub upstream: UpstreamHandle,
    pub upstream_addr: SocketAddr,
    trigger: ShutdownTrigger,
}

impl Stubs {
    pub async fn start(settings: StubSettings) -> Stubs {
        Stubs::start_keeping(settings, NODE_KEEP_ALIVE.as_secs()).await
    }

    /// Like [`Stubs::start`], with an upstream that keeps idle connections for `seconds`.
    pub async fn start_keeping(settings: StubSettings, seconds: u64) -> Stubs {
        let (trigger, signal) = shutdown::channel();
        let identity = IdentityStub::bind(loopback(), settings, SigningKey::bundled())
            .await
            .unwrap();
        let handle = identity.handle();
        tokio::spawn(identity.run(signal.clone()));
        let upstream = MosaicUpstream::bind(loopback(), handle.origin())
            .await
            .unwrap()
            .keep_alive(seconds);
        let upstream_addr = upstream.local_addr();
        let upstream_handle = upstream.handle();
        tokio::spawn(upstream.run(signal.clone()));
        Stubs {
            identity: handle,
            upstream: upstream_handle,
            upstream_addr,
            trigger,
        }
    }

    /// A configuration with one account and one catch-all route; `identity` is added to
    /// the `[identity]` table, `rest` to the end.
    pub fn config(&self, identity: &str, rest: &str) -> String {
        self.config_with_server("", identity, rest)
    }

    /// Like [`Stubs::config`], with `server` added to the `[server]` table.
    pub fn config_with_server(&self, server: &str, identity: &str, rest: &str) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
token_wait = "3s"
{server}

[identity]
origin = "{origin}"
{FAST_IDENTITY}
{identity}

[accounts.main]
client_id = "demo-client"
client_secret_env = "CLIENT_SECRET"

[[routes]]
upstream = "http://{upstream}"
account = "main"
{rest}
"#,
            origin = self.identity.origin(),
            upstream = self.upstream_addr,
        )
    }
}

impl Drop for Stubs {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

/// A running proxy.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub accounts: Arc<Vec<Arc<Account>>>,
    pub proxy: Arc<mosaic_auth_proxy::proxy::Proxy>,
    /// The configuration in use, and its reload.
    pub live: Arc<mosaic_auth_proxy::app::Live>,
    /// The further listeners' names and addresses.
    pub listeners: Vec<(String, String)>,
    trigger: ShutdownTrigger,
}

impl TestProxy {
    pub async fn start(config_text: &str) -> TestProxy {
        let config = Config::parse(config_text, &env).expect("the test configuration is valid");
        TestProxy::run(App::bind(config).await.expect("the proxy binds"))
    }

    /// Starts a proxy from a file, which a reload reads again.
    pub async fn start_file(path: &std::path::Path) -> TestProxy {
        let source = mosaic_auth_proxy::app::Source {
            path: path.to_owned(),
            listen: None,
            admin_listen: None,
        };
        let config = source.load().expect("the test configuration is valid");
        let app = App::bind_reloadable(config, Some(source))
            .await
            .expect("the proxy binds");
        TestProxy::run(app)
    }

    fn run(app: App) -> TestProxy {
        let (trigger, signal) = shutdown::channel();
        let proxy = TestProxy {
            addr: app.local_addr(),
            admin: app.admin_addr().expect("tests configure an admin listener"),
            accounts: app.accounts(),
            proxy: app.proxy(),
            live: app.live(),
            listeners: app.listener_addrs(),
            trigger,
        };
        tokio::spawn(app.run(signal));
        proxy
    }

    /// Waits (bounded) until every account holds a token.
    pub async fn ready(self) -> TestProxy {
        for account in self.accounts.iter() {
            account
                .header_or_wait(Duration::from_secs(5))
                .await
                .expect("the first token arrives");
        }
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

/// A proxy whose shutdown the test triggers and whose end it waits for.
pub struct Stoppable {
    pub addr: SocketAddr,
    pub trigger: ShutdownTrigger,
    /// Ends when the proxy has stopped.
    pub running: tokio::task::JoinHandle<()>,
}

/// Starts a proxy from `config_text` and waits (bounded) until its first account holds a
/// token.
pub async fn start_stoppable(config_text: &str) -> Stoppable {
    let config = Config::parse(config_text, &env).expect("the test configuration is valid");
    let app = App::bind(config).await.expect("the proxy binds");
    let (addr, accounts) = (app.local_addr(), app.accounts());
    let (trigger, signal) = shutdown::channel();
    let running = tokio::spawn(app.run(signal));
    accounts[0]
        .header_or_wait(Duration::from_secs(5))
        .await
        .expect("the first token arrives");
    Stoppable {
        addr,
        trigger,
        running,
    }
}

/// The stand-ins and a proxy in front of them.
pub struct Harness {
    pub stubs: Stubs,
    pub proxy: TestProxy,
}

/// Starts stand-ins with `settings` and a ready proxy with the default configuration.
pub async fn harness(settings: StubSettings) -> Harness {
    let stubs = Stubs::start(settings).await;
    let proxy = TestProxy::start(&stubs.config("", "")).await.ready().await;
    Harness { stubs, proxy }
}

/// An HTTP/1.1 client with a connection pool.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 prior-knowledge client.
pub fn h2_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `request` and reads the whole answer.
pub async fn send(client: &Client<HttpConnector, TestBody>, request: Request<TestBody>) -> Reply {
    read_reply(client.request(request).await.expect("the proxy answers")).await
}

/// Reads a whole answer.
async fn read_reply(response: http::Response<hyper::body::Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body arrives").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends a GET to `url`.
pub async fn get(url: &str) -> Reply {
    let request = Request::get(url).body(empty()).unwrap();
    send(&client(), request).await
}

/// Sends a GET for `path` (`Host: local`) over the Unix socket at `socket`.
pub async fn get_over_unix(socket: &std::path::Path, path: &str) -> Reply {
    let unix = tokio::net::UnixStream::connect(socket)
        .await
        .expect("the proxy listens on the socket");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(unix))
            .await
            .expect("an HTTP/1.1 connection over the socket");
    tokio::spawn(conn);
    let request = Request::get(path)
        .header(http::header::HOST, "local")
        .body(empty())
        .unwrap();
    read_reply(
        sender
            .send_request(request)
            .await
            .expect("the proxy answers"),
    )
    .await
}

/// Polls `check` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Steady traffic from a few workers until stopped; every answer that is not a 200 carrying
/// GraphQL data counts as a failure (Mosaic reports a refused token as 200 with errors).
pub struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<std::sync::atomic::AtomicU64>,
    sample: Arc<std::sync::Mutex<Option<String>>>,
    workers: tokio::task::JoinSet<()>,
}

/// The most a worker sends, so traffic stops by itself even if a test forgets to.
const TRAFFIC_CAP: u64 = 2_000_000;

/// Starts `workers` loops of GET `url`.
pub fn traffic(url: String, workers: usize) -> Traffic {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let sample = Arc::new(std::sync::Mutex::new(None));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (client, url) = (client(), url.clone());
        let (stop, done, failures, sample) =
            (stop.clone(), done.clone(), failures.clone(), sample.clone());
        set.spawn(async move {
            for _ in 0..TRAFFIC_CAP {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let reply = send(&client, Request::get(&url).body(empty()).unwrap()).await;
                let ok = reply.status == StatusCode::OK
                    && serde_json::from_slice::<serde_json::Value>(&reply.body)
                        .map(|v| v["data"].is_object() && v.get("errors").is_none())
                        .unwrap_or(false);
                if !ok {
                    failures.fetch_add(1, Ordering::SeqCst);
                    let text = format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body));
                    sample.lock().unwrap().get_or_insert(text);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    Traffic {
        stop,
        done,
        failures,
        sample,
        workers: set,
    }
}

impl Traffic {
    /// Stops the workers; returns (requests, failures, the first failure's answer).
    pub async fn stop(mut self) -> (u64, u64, Option<String>) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::SeqCst);
        while self.workers.join_next().await.is_some() {}
        let sample = self.sample.lock().unwrap().take();
        (
            self.done.load(Ordering::SeqCst),
            self.failures.load(Ordering::SeqCst),
            sample,
        )
    }
}

/// Log output captured in memory, for a test's own subscriber.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves TLS on loopback: each connection that completes its handshake with `acceptor` is
/// handed to `serve`. Bounded: after 16 connections it accepts no more.
pub async fn tls_server<F, Fut>(acceptor: tokio_rustls::TlsAcceptor, serve: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}
