//! HTTPS upstreams: verified with rustls against a configured CA, HTTP/2 chosen by ALPN.

use crate::support::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mosaic_auth_proxy::stub::StubSettings;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A TLS upstream on loopback whose certificate a fresh CA signed; answers with the HTTP
/// version and the `Authorization` it saw. Returns its address, the CA's PEM and the count of
/// connections it accepted.
async fn tls_upstream() -> (std::net::SocketAddr, String, Arc<AtomicUsize>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let addr = tls_server(acceptor, move |tls| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
        let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
            let auth = req
                .headers()
                .get("authorization")
                .is_some_and(|v| v.as_bytes().starts_with(b"Bearer "));
            let body = serde_json::json!({"data": {"version": format!("{:?}", req.version()), "bearer": auth}});
            let mut response = Response::new(Full::new(bytes::Bytes::from(body.to_string())));
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            Ok::<_, Infallible>(response)
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service)
            .await;
        }
    })
    .await;
    (addr, ca.pem(), accepted)
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_ca_and_spoken_to_over_http2() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let (addr, ca_pem, _) = tls_upstream().await;
    let dir = std::env::temp_dir().join(format!("map-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let route = format!(
        "[[routes]]\npath_prefix = \"/secure\"\nupstream = \"https://localhost:{}\"\naccount = \"main\"\n",
        addr.port()
    );

    let trusting = format!(
        "{}\n[tls]\nca_file = {:?}\n",
        stubs.config("", &route),
        ca_file.display().to_string()
    );
    let proxy = TestProxy::start(&trusting).await.ready().await;
    let reply = get(&proxy.url("/secure/x")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["data"]["version"], "HTTP/2.0");
    assert_eq!(reply.json()["data"]["bearer"], true);

    // Without the CA the upstream's certificate is refused: no request leaves unverified.
    let proxy = TestProxy::start(&stubs.config("", &route))
        .await
        .ready()
        .await;
    let reply = get(&proxy.url("/secure/x")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"], "upstream_unreachable");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A proxy started from a file that routes `/secure` to the TLS upstream at `addr`, trusting
/// `[tls] ca_file` `ca_file`.
async fn proxy_trusting_file(
    stubs: &Stubs,
    addr: std::net::SocketAddr,
    ca_file: &std::path::Path,
) -> TestProxy {
    let dir = ca_file.parent().unwrap();
    let route = format!(
        "[[routes]]\npath_prefix = \"/secure\"\nupstream = \"https://localhost:{}\"\naccount = \"main\"\n",
        addr.port()
    );
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let file = dir.join("proxy.toml");
    let config = format!(
        "{}\n[tls]\nca_file = {:?}\n",
        // One worker: each has an upstream connection of its own.
        stubs.config_with_server("workers = 1", "", &route).replace(
            "client_secret_env = \"CLIENT_SECRET\"",
            &format!("client_secret_file = {:?}", secret.display().to_string())
        ),
        ca_file.display().to_string()
    );
    std::fs::write(&file, config).unwrap();
    TestProxy::start_file(&file).await.ready().await
}

async fn reload(proxy: &TestProxy) {
    let reload = Request::post(format!("http://{}/reload", proxy.admin))
        .body(empty())
        .unwrap();
    let reply = send(&client(), reload).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

#[tokio::test]
async fn a_reload_that_keeps_a_pool_opens_its_next_connections_with_the_ca_file_as_it_is_then() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let (addr, ca_pem, _) = tls_upstream().await;
    let (_, other_ca_pem, _) = tls_upstream().await;
    let dir = crate::operations::tempdir();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, other_ca_pem).unwrap();
    let proxy = proxy_trusting_file(&stubs, addr, &ca_file).await;
    let reply = get(&proxy.url("/secure/x")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);

    // The same configuration, the CA file replaced by the one that signed the upstream.
    std::fs::write(&ca_file, ca_pem).unwrap();
    reload(&proxy).await;
    let reply = get(&proxy.url("/secure/x")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json()["data"]["bearer"], true);
}

#[tokio::test]
async fn a_reload_keeps_the_upstream_connection_until_the_certificates_change() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let (addr, ca_pem, accepted) = tls_upstream().await;
    let (_, other_ca_pem, _) = tls_upstream().await;
    let dir = crate::operations::tempdir();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let proxy = proxy_trusting_file(&stubs, addr, &ca_file).await;
    let secure = proxy.url("/secure/x");
    assert_eq!(get(&secure).await.status, StatusCode::OK);
    reload(&proxy).await;
    assert_eq!(get(&secure).await.status, StatusCode::OK);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the files did not change"
    );

    // Another CA beside the upstream's: still trusted, but not what the connection was
    // verified against.
    std::fs::write(&ca_file, format!("{ca_pem}{other_ca_pem}")).unwrap();
    reload(&proxy).await;
    for _ in 0..3 {
        assert_eq!(get(&secure).await.status, StatusCode::OK);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
