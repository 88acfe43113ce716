//! TLS on both sides. The listener: HTTP/1.1 and HTTP/2 by ALPN, certificates renewed
//! without a restart, and client certificates, required or checked by a route's access rule.
//! Upstreams: a CA, a client certificate and a server name of a route's own.

use crate::support::*;
use http::{header, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mosaic_auth_proxy::stub::StubSettings;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(5);

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A leaf for `dns` names (a server) or, with `uri`, a client with that SPIFFE id.
    fn leaf(
        &self,
        cn: &str,
        dns: &[&str],
        uri: Option<&str>,
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.der().clone(), key)
    }

    fn pem(&self) -> String {
        self.0.pem()
    }
}

fn pem_cert(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(name: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("map-ltls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn server(&self, cert: &CertificateDer<'_>, key: &KeyPair) {
        std::fs::write(self.path("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(self.path("cert.pem"), pem_cert(cert)).unwrap();
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n{extra}",
            self.path("cert.pem").display().to_string(),
            self.path("key.pem").display().to_string()
        )
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS client trusting `ca`, offering `alpn`, with an optional client certificate.
fn connector(
    ca: &Ca,
    alpn: &[&[u8]],
    client: Option<(CertificateDer<'static>, KeyPair)>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.0.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects over TLS, sends GET `path` with the protocol ALPN agreed; returns the status,
/// the protocol and the server's certificate, or the error.
async fn get_over_tls(
    proxy: &TestProxy,
    tls: &tokio_rustls::TlsConnector,
    path: &str,
) -> Result<(StatusCode, Vec<u8>, CertificateDer<'static>), String> {
    get_over_tls_at(&proxy.addr.to_string(), tls, path).await
}

async fn get_over_tls_at(
    addr: &str,
    tls: &tokio_rustls::TlsConnector,
    path: &str,
) -> Result<(StatusCode, Vec<u8>, CertificateDer<'static>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (_, session) = stream.get_ref();
    let alpn = session.alpn_protocol().unwrap_or_default().to_vec();
    let cert = session.peer_certificates().unwrap()[0].clone().into_owned();
    // HTTP/2 names the authority in the request; HTTP/1.1 sends the origin form and Host.
    let target = if alpn == b"h2" {
        format!("https://localhost{path}")
    } else {
        path.to_owned()
    };
    let request = Request::get(target)
        .header(header::HOST, "localhost")
        .body(empty())
        .unwrap();
    let io = TokioIo::new(stream);
    let response = if alpn == b"h2" {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(request).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(request).await
    };
    let response = response.map_err(|e| e.to_string())?;
    Ok((response.status(), alpn, cert))
}

#[tokio::test]
async fn the_listener_speaks_tls_with_alpn_and_serves_a_renewed_certificate_without_a_restart() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let ca = Ca::new("test server CA");
    let files = Files::new("renew");
    let (first, first_key) = ca.leaf("proxy", &["localhost"], None);
    files.server(&first, &first_key);
    let text = stubs.config_with_server(&files.config("tls_reload = \"50ms\""), "", "");
    let proxy = TestProxy::start(&text).await.ready().await;

    let (status, alpn, cert) = get_over_tls(
        &proxy,
        &connector(&ca, &[b"h2", b"http/1.1"], None),
        "/whoami",
    )
    .await
    .unwrap();
    assert_eq!((status, alpn.as_slice()), (StatusCode::OK, &b"h2"[..]));
    assert_eq!(cert, first);
    let (status, alpn, _) = get_over_tls(&proxy, &connector(&ca, &[b"http/1.1"], None), "/whoami")
        .await
        .unwrap();
    assert_eq!(
        (status, alpn.as_slice()),
        (StatusCode::OK, &b"http/1.1"[..])
    );
    assert!(stubs.upstream.last().unwrap().verdict.is_ok());

    let (second, second_key) = ca.leaf("proxy renewed", &["localhost"], None);
    files.server(&second, &second_key);
    let renewed = eventually(PATIENCE, async || {
        let tls = connector(&ca, &[b"h2"], None);
        matches!(get_over_tls(&proxy, &tls, "/whoami").await, Ok((StatusCode::OK, _, cert)) if cert == second)
    })
    .await;
    assert!(renewed, "the renewed certificate was not served");
}

#[tokio::test]
async fn client_certificates_are_required_or_checked_by_the_route() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new("clients");
    let (cert, key) = server_ca.leaf("proxy", &["localhost"], None);
    files.server(&cert, &key);
    std::fs::write(files.path("clients.pem"), client_ca.pem()).unwrap();
    let app = || client_ca.leaf("app", &[], Some("spiffe://example.org/app"));
    let other = || client_ca.leaf("other", &[], Some("spiffe://example.org/other"));
    let routes = format!(
        "[[routes]]\npath_prefix = \"/guarded\"\nstrip_prefix = true\nupstream = \"http://{}\"\naccount = \"main\"\n\
         [routes.access]\nclient_cert = [\"spiffe://example.org/app\"]\n",
        stubs.upstream_addr
    );
    let ca_file = format!(
        "tls_client_ca_file = {:?}\n",
        files.path("clients.pem").display().to_string()
    );

    // Required: no certificate, no connection.
    let required =
        TestProxy::start(&stubs.config_with_server(&files.config(&ca_file), "", &routes))
            .await
            .ready()
            .await;
    let without = get_over_tls(&required, &connector(&server_ca, &[b"h2"], None), "/whoami").await;
    assert!(
        without.is_err(),
        "served without a client certificate: {without:?}"
    );
    let with_app = get_over_tls(
        &required,
        &connector(&server_ca, &[b"h2"], Some(app())),
        "/guarded/whoami",
    )
    .await;
    assert_eq!(with_app.unwrap().0, StatusCode::OK);
    assert_eq!(stubs.upstream.last().unwrap().path, "/whoami");
    assert!(
        stubs.upstream.last().unwrap().verdict.is_ok(),
        "forwarded with the token"
    );
    let before = stubs.upstream.requests();
    let with_other = get_over_tls(
        &required,
        &connector(&server_ca, &[b"h2"], Some(other())),
        "/guarded/whoami",
    )
    .await;
    assert_eq!(with_other.unwrap().0, StatusCode::FORBIDDEN);
    assert_eq!(stubs.upstream.requests(), before);

    // Optional: the route's rule decides.
    let optional = format!("{ca_file}tls_client_auth = \"optional\"\n");
    let optional =
        TestProxy::start(&stubs.config_with_server(&files.config(&optional), "", &routes))
            .await
            .ready()
            .await;
    let anonymous = connector(&server_ca, &[b"h2"], None);
    assert_eq!(
        get_over_tls(&optional, &anonymous, "/whoami")
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    assert_eq!(
        get_over_tls(&optional, &anonymous, "/guarded/whoami")
            .await
            .unwrap()
            .0,
        StatusCode::FORBIDDEN
    );
    let with_app = get_over_tls(
        &optional,
        &connector(&server_ca, &[b"h2"], Some(app())),
        "/guarded/whoami",
    )
    .await;
    assert_eq!(with_app.unwrap().0, StatusCode::OK);
}

#[test]
fn listener_tls_settings_are_checked_with_the_file_at_fault_named() {
    use mosaic_auth_proxy::config::Config;
    let base = "[accounts.a]\nclient_id = \"a\"\nclient_secret_env = \"CLIENT_SECRET\"\n[[routes]]\nupstream = \"http://up\"\naccount = \"a\"\n";
    let keys = |server: &str| -> Vec<String> {
        let text = format!("[server]\n{server}\n{base}");
        Config::parse(&text, &env)
            .map_or_else(|e| e.0.into_iter().map(|e| e.key).collect(), |_| Vec::new())
    };
    assert_eq!(
        keys("tls_cert_file = \"/nonexistent/cert.pem\""),
        ["server.tls_key_file"]
    );
    assert_eq!(
        keys("tls_cert_file = \"/nonexistent/cert.pem\"\ntls_key_file = \"/nonexistent/key.pem\""),
        ["server.tls_cert_file"]
    );
    assert_eq!(
        keys("tls_client_auth = \"optional\""),
        ["server.tls_client_auth"]
    );
    let guarded = format!("[server]\n{base}[routes.access]\nclient_cert = [\"CN=app\"]\n");
    let errors = Config::parse(&guarded, &env).unwrap_err();
    assert_eq!(errors.0[0].key, "routes[0].access.client_cert");

    // An expired server certificate works, with a warning at start.
    let ca = Ca::new("expired CA");
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = params.signed_by(&key, &ca.0).unwrap();
    let files = Files::new("expired");
    files.server(cert.der(), &key);
    let text = format!("[server]\n{}\n{base}", files.config(""));
    let config = Config::parse(&text, &env).unwrap();
    assert!(
        config.warnings.iter().any(|w| w.contains("expired")),
        "{:?}",
        config.warnings
    );
}

/// A TLS acceptor for `name`, certified by `server_ca`, that demands a client certificate of
/// `client_ca`; ALPN h2 and http/1.1.
fn demanding_acceptor(server_ca: &Ca, name: &str, client_ca: &Ca) -> tokio_rustls::TlsAcceptor {
    let (cert, key) = server_ca.leaf(name, &[name], None);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.0.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// An HTTPS upstream for `upstream.internal` that demands a client certificate of
/// `client_ca`; answers 200 with whether a bearer token came.
async fn mtls_upstream(server_ca: &Ca, client_ca: &Ca) -> std::net::SocketAddr {
    let acceptor = demanding_acceptor(server_ca, "upstream.internal", client_ca);
    tls_server(acceptor, |tls| async move {
        let service =
            hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let bearer = req.headers().contains_key(header::AUTHORIZATION);
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(format!("bearer={bearer}")),
                )))
            });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service)
            .await;
    })
    .await
}

// A current-thread runtime keeps every task on the thread whose subscriber captures them.
#[tokio::test(flavor = "current_thread")]
async fn a_route_reaches_an_mtls_upstream_with_its_own_ca_client_certificate_and_server_name() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("mosaic_auth_proxy=warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let stubs = Stubs::start(StubSettings::default()).await;
    let (upstream_ca, client_ca, unrelated_ca) = (
        Ca::new("upstream CA"),
        Ca::new("client CA"),
        Ca::new("other CA"),
    );
    let addr = mtls_upstream(&upstream_ca, &client_ca).await;
    let files = Files::new("mtls");
    std::fs::write(files.path("upstream-ca.pem"), upstream_ca.pem()).unwrap();
    std::fs::write(files.path("global-ca.pem"), unrelated_ca.pem()).unwrap();
    let (cert, key) = client_ca.leaf("proxy", &[], Some("spiffe://example.org/proxy"));
    std::fs::write(files.path("client.pem"), pem_cert(&cert)).unwrap();
    std::fs::write(files.path("client.key"), key.serialize_pem()).unwrap();
    let p = |name: &str| format!("{:?}", files.path(name).display().to_string());
    let routes = format!(
        "[[routes]]\npath_prefix = \"/mtls\"\nupstream = \"https://{addr}\"\naccount = \"main\"\n\
         [routes.tls]\nca_file = {ca}\nclient_cert_file = {cert}\nclient_key_file = {key}\nserver_name = \"upstream.internal\"\n\
         [[routes]]\npath_prefix = \"/anonymous\"\nupstream = \"https://{addr}\"\naccount = \"main\"\n\
         [routes.tls]\nca_file = {ca}\nserver_name = \"upstream.internal\"\n\
         [[routes]]\npath_prefix = \"/global\"\nupstream = \"https://{addr}\"\naccount = \"main\"\n\
         [tls]\nca_file = {global}\n",
        ca = p("upstream-ca.pem"),
        cert = p("client.pem"),
        key = p("client.key"),
        global = p("global-ca.pem"),
    );
    let proxy = TestProxy::start(&stubs.config("", &routes))
        .await
        .ready()
        .await;
    let reply = get(&proxy.url("/mtls/x")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(&reply.body[..], b"bearer=true");
    // Without the client certificate the upstream refuses; with only the global CA the
    // upstream's certificate is not trusted. Both are a clear 502.
    for path in ["/anonymous/x", "/global/x"] {
        let reply = get(&proxy.url(path)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{path}");
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .starts_with("upstream_"),
            "{path}"
        );
    }
    // Each failure is a warning that names its cause.
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let failures: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("failed"))
        .collect();
    assert_eq!(failures.len(), 2, "{logs}");
    assert!(failures.iter().all(|l| l.contains("upstream")), "{logs}");
}

/// A TLS front for `id.internal` before a plain identity stand-in, demanding a client
/// certificate of `client_ca`.
async fn tls_front(server_ca: &Ca, client_ca: &Ca, behind: String) -> std::net::SocketAddr {
    let acceptor = demanding_acceptor(server_ca, "id.internal", client_ca);
    tls_server(acceptor, move |mut tls| {
        let behind = behind.clone();
        async move {
            let mut plain = tokio::net::TcpStream::connect(behind).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        }
    })
    .await
}

/// Puts a client certificate of `ca` (and its key) in `client.pem` and `client.key`.
fn write_client_cert(files: &Files, ca: &Ca) {
    let (cert, key) = ca.leaf("proxy", &[], Some("spiffe://example.org/proxy"));
    std::fs::write(files.path("client.pem"), pem_cert(&cert)).unwrap();
    std::fs::write(files.path("client.key"), key.serialize_pem()).unwrap();
}

/// Puts the identity stub behind a TLS front (`server_ca`'s certificate for `id.internal`,
/// a client certificate of `client_ca` required) and returns a configuration that reaches
/// it by that name with `ca.pem`, `client.pem` and `client.key` of `files`.
async fn identity_over_tls(stubs: &Stubs, server_ca: &Ca, client_ca: &Ca, files: &Files) -> String {
    let plain = stubs
        .identity
        .origin()
        .trim_start_matches("http://")
        .to_owned();
    let front = tls_front(server_ca, client_ca, plain).await;
    let p = |name: &str| format!("{:?}", files.path(name).display().to_string());
    stubs
        .config("", "")
        .replace(
            &format!("origin = \"{}\"", stubs.identity.origin()),
            &format!("origin = \"https://{front}\""),
        )
        + &format!(
            "[identity.tls]\nca_file = {}\nclient_cert_file = {}\nclient_key_file = {}\nserver_name = \"id.internal\"\n",
            p("ca.pem"),
            p("client.pem"),
            p("client.key")
        )
}

#[tokio::test]
async fn the_identity_service_is_reached_with_its_own_ca_client_certificate_and_server_name() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let (server_ca, client_ca) = (Ca::new("identity CA"), Ca::new("client CA"));
    let files = Files::new("identity");
    std::fs::write(files.path("ca.pem"), server_ca.pem()).unwrap();
    write_client_cert(&files, &client_ca);
    let text = identity_over_tls(&stubs, &server_ca, &client_ca, &files).await;
    let proxy = TestProxy::start(&text).await.ready().await;
    let reply = get(&proxy.url("/whoami")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(stubs.identity.token_requests(), 1);
}

#[tokio::test]
async fn a_reload_reaches_the_identity_service_with_the_client_certificate_as_it_is_then() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let (server_ca, client_ca) = (Ca::new("identity CA"), Ca::new("client CA"));
    let files = Files::new("identity-reload");
    std::fs::write(files.path("ca.pem"), server_ca.pem()).unwrap();
    // A certificate the identity service does not accept.
    write_client_cert(&files, &Ca::new("stranger CA"));
    std::fs::write(files.path("secret"), SECRET).unwrap();
    let text = identity_over_tls(&stubs, &server_ca, &client_ca, &files)
        .await
        .replace(
            "client_secret_env = \"CLIENT_SECRET\"",
            &format!(
                "client_secret_file = {:?}",
                files.path("secret").display().to_string()
            ),
        );
    std::fs::write(files.path("proxy.toml"), text).unwrap();
    let proxy = TestProxy::start_file(&files.path("proxy.toml")).await;
    let reply = get(&proxy.url("/whoami")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);

    // The same configuration, the certificate renewed by one the service accepts.
    write_client_cert(&files, &client_ca);
    let reload = Request::post(format!("http://{}/reload", proxy.admin))
        .body(empty())
        .unwrap();
    let reply = send(&client(), reload).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    assert!(
        proxy.accounts[0].wait_ready(deadline).await,
        "no token with the renewed certificate"
    );
    let reply = get(&proxy.url("/whoami")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(stubs.identity.token_requests(), 1);
}

#[tokio::test]
async fn a_further_listener_has_tls_of_its_own() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let ca = Ca::new("listener CA");
    let files = Files::new("further");
    let (cert, key) = ca.leaf("secure", &["localhost"], None);
    files.server(&cert, &key);
    let rest = format!(
        "[listeners.secure]\nlisten = \"127.0.0.1:0\"\n{}\n[[routes]]\npath_prefix = \"/secure\"\nstrip_prefix = true\nupstream = \"http://{}\"\naccount = \"main\"\nlistener = \"secure\"\n",
        files.config(""),
        stubs.upstream_addr
    );
    let proxy = TestProxy::start(&stubs.config("", &rest))
        .await
        .ready()
        .await;
    let secure = proxy
        .listeners
        .iter()
        .find(|(n, _)| n == "secure")
        .unwrap()
        .1
        .clone();
    let reply = get_over_tls_at(&secure, &connector(&ca, &[b"h2"], None), "/secure/whoami").await;
    assert_eq!(reply.unwrap().0, StatusCode::OK);
    // The main listener stays plain and serves its own catch-all route, which does not strip
    // the prefix as the secure listener's route does.
    assert_eq!(
        get(&proxy.url("/secure/whoami")).await.status,
        StatusCode::OK
    );
    assert_eq!(stubs.upstream.last().unwrap().path, "/secure/whoami");
}
