//! Who may borrow which account: each access rule allowed and refused. A refusal reaches no
//! upstream and costs no token request.

use crate::support::*;
use http::{header, Method, Request, StatusCode};
use mosaic_auth_proxy::stub::StubSettings;

/// A request of the table: method, path, headers.
type Case = (
    Method,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Sends `method` to `path` with `headers`; returns the status.
async fn status(
    proxy: &TestProxy,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> StatusCode {
    let mut request = Request::builder().method(method).uri(proxy.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(&client(), request.body(empty()).unwrap()).await.status
}

fn routes(rules: &[(&str, &str)]) -> String {
    rules
        .iter()
        .map(|(prefix, access)| {
            format!(
                "[[routes]]\npath_prefix = \"{prefix}\"\nstrip_prefix = true\nupstream = \"http://{{up}}\"\naccount = \"main\"\n[routes.access]\n{access}\n"
            )
        })
        .collect()
}

#[tokio::test]
async fn each_access_rule_admits_what_it_names_and_refuses_the_rest_for_free() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let text = routes(&[
        ("/lan", "networks = [\"127.0.0.0/8\"]"),
        ("/far", "networks = [\"10.0.0.0/8\", \"fd00::/8\"]"),
        ("/read", "methods = [\"GET\"]"),
        (
            "/some",
            "paths = [\"/whoami\", \"/v1/*/whoami\", \"/files/**\"]",
        ),
        (
            "/marked",
            "header = \"x-proxy-key\"\nheader_value_env = \"MARKER\"",
        ),
    ])
    .replace("{up}", &stubs.upstream_addr.to_string());
    let proxy = TestProxy::start(&stubs.config("", &text))
        .await
        .ready()
        .await;
    let tokens = stubs.identity.token_requests();

    let allowed: [Case; 7] = [
        (Method::GET, "/lan/whoami", &[]),
        (Method::GET, "/read/whoami", &[]),
        (Method::GET, "/some/whoami", &[]),
        (Method::GET, "/some/v1/x/whoami", &[]),
        (Method::GET, "/some/files/a/b", &[]),
        (
            Method::GET,
            "/marked/whoami",
            &[("x-proxy-key", "let-me-in")],
        ),
        (
            Method::POST,
            "/marked/whoami",
            &[("x-proxy-key", "let-me-in")],
        ),
    ];
    for (method, path, headers) in allowed {
        let before = stubs.upstream.requests();
        assert_eq!(
            status(&proxy, method.clone(), path, headers).await,
            StatusCode::OK,
            "{method} {path}"
        );
        assert_eq!(stubs.upstream.requests(), before + 1);
    }
    // The marker is for the proxy alone.
    assert!(!stubs
        .upstream
        .last()
        .unwrap()
        .headers
        .contains_key("x-proxy-key"));

    let refused: [Case; 7] = [
        (Method::GET, "/far/whoami", &[]),
        (Method::POST, "/read/whoami", &[]),
        (Method::GET, "/some/other", &[]),
        (Method::GET, "/some/v1/x/y/whoami", &[]),
        (Method::GET, "/marked/whoami", &[]),
        (
            Method::GET,
            "/marked/whoami",
            &[("x-proxy-key", "let-me-inn")],
        ),
        (
            Method::GET,
            "/marked/whoami",
            &[("x-proxy-key", "let-me-in"), ("x-proxy-key", "let-me-in")],
        ),
    ];
    for (method, path, headers) in refused {
        let before = stubs.upstream.requests();
        let mut request = Request::builder()
            .method(method.clone())
            .uri(proxy.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let reply = send(&client(), request.body(empty()).unwrap()).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(reply.json()["error"], "access_denied");
        assert_eq!(
            stubs.upstream.requests(),
            before,
            "{method} {path} was forwarded"
        );
    }
    assert_eq!(
        stubs.identity.token_requests(),
        tokens,
        "a refusal cost a token request"
    );
}

#[tokio::test]
async fn ipv6_client_networks_are_matched() {
    let stubs = Stubs::start(StubSettings::default()).await;
    let text = routes(&[
        ("/local", "networks = [\"::1/128\"]"),
        ("/remote", "networks = [\"fd00::/8\", \"127.0.0.0/8\"]"),
    ])
    .replace("{up}", &stubs.upstream_addr.to_string());
    let config = stubs
        .config("", &text)
        .replace("listen = \"127.0.0.1:0\"", "listen = \"[::1]:0\"");
    let proxy = TestProxy::start(&config).await.ready().await;
    let url = |path: &str| format!("http://[::1]:{}{path}", proxy.addr.port());
    let get_status = async |path: &str| {
        let request = Request::get(url(path))
            .header(header::HOST, "proxy")
            .body(empty())
            .unwrap();
        send(&client(), request).await.status
    };
    assert_eq!(get_status("/local/whoami").await, StatusCode::OK);
    assert_eq!(get_status("/remote/whoami").await, StatusCode::FORBIDDEN);
}
