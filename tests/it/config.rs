//! Configuration errors name their key and the fix, all at once.

use mosaic_auth_proxy::config::{Config, ConfigErrors, SecretSource};
use std::time::Duration;

fn env(name: &str) -> Option<String> {
    match name {
        "SECRET" => Some("s3cr3t".into()),
        "EMPTY" => Some("  ".into()),
        _ => None,
    }
}

const VALID: &str = r#"
[accounts.media]
client_id = "id"
client_secret_env = "SECRET"
[[routes]]
upstream = "https://media.example"
account = "media"
"#;

fn errors(text: &str) -> ConfigErrors {
    Config::parse(text, &env).expect_err("the configuration is refused")
}

fn keys(text: &str) -> Vec<String> {
    errors(text).0.into_iter().map(|e| e.key).collect()
}

#[test]
fn the_shipped_proxy_toml_parses() {
    let text = include_str!("../../proxy.toml");
    let config = Config::parse(text, &|name| {
        (name == "MEDIA_CLIENT_SECRET").then(|| "x".into())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(
        config.accounts[0].secret_source,
        SecretSource::Env("MEDIA_CLIENT_SECRET".into())
    );
    assert_eq!(
        config.routes[0].upstream.to_string(),
        "https://media.service.eu.axinom.net"
    );
    assert!(config.warnings.is_empty());
}

#[test]
fn a_minimal_configuration_gets_the_documented_defaults() {
    let config = Config::parse(VALID, &env).unwrap();
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.identity.origin, "https://id.service.eu.axinom.net");
    assert_eq!(config.identity.timeout, Duration::from_secs(10));
    assert_eq!(config.routes[0].path_prefix, "/");
    assert_eq!(config.accounts[0].secret.expose(), "s3cr3t");
    assert!(config.server.admin_listen.is_none());
}

#[test]
fn unknown_keys_are_errors_wherever_they_are() {
    let text =
        format!("colour = 1\n[server]\nlisten_addr = \"x\"\n{VALID}\nupstream_path = \"/x\"\n");
    let found = keys(&text);
    assert_eq!(
        found,
        ["colour", "server.listen_addr", "routes[0].upstream_path"]
    );
    let e = errors(&text);
    assert!(e.0[1].fix.contains("listen"), "{}", e.0[1].fix);
}

#[test]
fn every_bad_key_is_reported_at_once_each_with_its_fix() {
    let text = r#"
[server]
listen = "localhost"
upstream_timeout = "soon"
[identity]
origin = "ftp://id.example"
refresh_at = 2.0
retry_initial = "1s"
retry_max = "10ms"
[accounts.media]
client_secret_env = "MISSING"
[accounts.video]
client_id = "v"
client_secret_env = "EMPTY"
[accounts.image]
client_id = "i"
client_secret_env = "SECRET"
client_secret = "also"
[[routes]]
upstream = "gopher://x"
account = "nobody"
path_prefix = "media"
[[routes]]
account = "image"
"#;
    let e = errors(text);
    let found: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "server.listen",
        "server.upstream_timeout",
        "identity.origin",
        "identity.refresh_at",
        "identity.retry_max",
        "accounts.media.client_id",
        "accounts.media.client_secret_env",
        "accounts.video.client_secret_env",
        "accounts.image.client_secret_env",
        "routes[0].upstream",
        "routes[0].account",
        "routes[0].path_prefix",
        "routes[1].upstream",
    ] {
        assert!(found.contains(&key), "{key} not reported in {found:?}");
    }
    for error in &e.0 {
        assert!(!error.fix.is_empty(), "{} has no fix", error.key);
    }
    let text = e.to_string();
    assert!(text.contains("export MISSING"), "{text}");
    assert!(!text.contains("s3cr3t") && !text.contains("also"), "{text}");
}

#[test]
fn syntax_errors_name_the_line_and_never_echo_it() {
    let text = "[accounts.a]\nclient_id = \"a\"\nclient_secret = \"hunter2\" oops\n";
    let e = errors(text);
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].key, "line 3");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn a_missing_accounts_or_routes_table_is_named() {
    assert_eq!(keys(""), ["accounts", "routes"]);
}

#[test]
fn wrong_types_name_the_expected_type() {
    let text = VALID.replace("[[routes]]", "[server]\nlisten = 8080\n[[routes]]");
    let e = errors(&text);
    assert_eq!(e.0[0].key, "server.listen");
    assert!(
        e.0[0].problem.contains("must be a string"),
        "{}",
        e.0[0].problem
    );
}

#[test]
fn repeated_routes_are_refused() {
    let text =
        format!("{VALID}[[routes]]\nupstream = \"https://b.example\"\naccount = \"media\"\n");
    assert_eq!(keys(&text), ["routes[1].path_prefix"]);
}

#[test]
fn secrets_come_from_files_and_inline_secrets_warn() {
    let dir = std::env::temp_dir().join(format!("map-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, "from-file\n").unwrap();
    let text = VALID.replace(
        "client_secret_env = \"SECRET\"",
        &format!("client_secret_file = {:?}", file.display().to_string()),
    );
    let config = Config::parse(&text, &env).unwrap();
    assert_eq!(config.accounts[0].secret.expose(), "from-file");
    let missing = text.replace("secret\"", "nothing-here\"");
    assert_eq!(keys(&missing), ["accounts.media.client_secret_file"]);
    let inline = VALID.replace("client_secret_env = \"SECRET\"", "client_secret = \"x\"");
    let config = Config::parse(&inline, &env).unwrap();
    assert!(config.warnings[0].contains("accounts.media.client_secret"));
    assert!(!config.warnings[0].contains("\"x\""));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_path_on_the_identity_origin_is_dropped_with_a_warning() {
    let text = format!("[identity]\norigin = \"https://id.example/auth/\"\n{VALID}");
    let config = Config::parse(&text, &env).unwrap();
    assert_eq!(config.identity.origin, "https://id.example");
    assert!(config.warnings[0].contains("identity.origin"));
}

#[test]
fn a_ca_file_that_holds_no_certificate_is_named() {
    let text = format!("[tls]\nca_file = \"/nonexistent/ca.pem\"\n{VALID}");
    assert_eq!(keys(&text), ["tls.ca_file"]);
}

#[test]
fn plain_http_to_a_remote_identity_service_warns_and_loopback_does_not() {
    let remote = format!("[identity]\norigin = \"http://id.example\"\n{VALID}");
    let config = Config::parse(&remote, &env).unwrap();
    assert!(
        config.warnings[0].contains("unencrypted"),
        "{:?}",
        config.warnings
    );
    for local in [
        "http://127.0.0.1:8081",
        "http://localhost:1",
        "http://[::1]:2",
    ] {
        let text = format!("[identity]\norigin = \"{local}\"\n{VALID}");
        assert!(
            Config::parse(&text, &env).unwrap().warnings.is_empty(),
            "{local}"
        );
    }
}

#[test]
fn the_client_bounds_have_safe_defaults() {
    let server = Config::parse(VALID, &env).unwrap().server;
    let limits = &server.limits;
    assert_eq!(
        limits.max_connections, None,
        "derived from the open-file limit"
    );
    assert_eq!(limits.header_timeout, Duration::from_secs(10));
    assert_eq!(limits.idle_timeout, Duration::from_secs(60));
    assert_eq!(limits.write_timeout, Duration::from_secs(60));
    assert_eq!(server.body_timeout, Duration::from_secs(30));
    assert_eq!(server.min_body_rate, 240);
    assert_eq!(server.replay_memory, 64 * 1024 * 1024);
    assert_eq!(limits.h2_max_concurrent_streams, 100);
    assert!(server.trusted_proxies.is_empty());
    let route = &Config::parse(VALID, &env).unwrap().routes[0];
    assert_eq!(route.upgrades, ["websocket"]);
    assert!(!route.allow_encoded_slashes);
}

#[test]
fn bad_client_bounds_are_named_with_their_fix() {
    let text = format!(
        r#"
[server]
max_connections = 0
header_timeout = "0s"
idle_timeout = "never"
h2_stream_window = 1048576
h2_connection_window = 65535
replay_body_limit = 65536
replay_memory = 1024
trusted_proxies = ["10.0.0.0/8", "not-a-network", "::1"]
max_uri_bytes = 10
{VALID}upgrades = ["websocket", "bad protocol"]
"#
    );
    let e = errors(&text);
    let found: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        found,
        [
            "server.max_connections",
            "server.idle_timeout",
            "server.trusted_proxies",
            "server.max_uri_bytes",
            "server.header_timeout",
            "server.h2_connection_window",
            "server.replay_memory",
            "routes[0].upgrades",
        ]
    );
    let text = e.to_string();
    assert!(text.contains("\"not-a-network\""), "{text}");
    assert!(text.contains("CIDR"), "{text}");
}

#[test]
fn trusted_proxies_take_networks_and_single_addresses() {
    let text = VALID.replace(
        "[[routes]]",
        "[server]\ntrusted_proxies = [\"10.1.2.3/8\", \"::1\", \"192.0.2.7\"]\n[[routes]]",
    );
    let server = Config::parse(&text, &env).unwrap().server;
    let nets: Vec<String> = server
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128", "192.0.2.7/32"]);
}

#[test]
fn forwarding_headers_default_to_all_five_and_name_a_bad_one() {
    use mosaic_auth_proxy::config::ForwardingHeaders;
    let server = Config::parse(VALID, &env).unwrap().server;
    assert_eq!(server.forwarding_headers, ForwardingHeaders::ALL);
    let with = |list: &str| {
        VALID.replace(
            "[[routes]]",
            &format!("[server]\nforwarding_headers = {list}\n[[routes]]"),
        )
    };
    let server = Config::parse(&with("[]"), &env).unwrap().server;
    assert_eq!(server.forwarding_headers, ForwardingHeaders::NONE);
    let server = Config::parse(&with(r#"["X-Forwarded-For", "forwarded"]"#), &env)
        .unwrap()
        .server;
    assert_eq!(
        server.forwarding_headers,
        ForwardingHeaders::X_FORWARDED_FOR.with(ForwardingHeaders::FORWARDED)
    );
    let e = errors(&with(r#"["x-forwarded-for", "x-client-ip"]"#));
    let found: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(found, ["server.forwarding_headers"]);
    let text = e.to_string();
    assert!(text.contains("\"x-client-ip\""), "{text}");
    assert!(text.contains("or [] for none"), "{text}");
}

#[test]
fn accept_switches_are_off_unless_set_and_a_bad_value_names_the_key() {
    let read = |key: &str, config: Config| match key {
        "defer_accept" => config.server.defer_accept,
        _ => config.server.quickack,
    };
    for key in ["defer_accept", "quickack"] {
        assert!(!read(key, Config::parse(VALID, &env).unwrap()), "{key}");
        let with = |value: &str| {
            VALID.replace(
                "[[routes]]",
                &format!("[server]\n{key} = {value}\n[[routes]]"),
            )
        };
        assert!(
            read(key, Config::parse(&with("true"), &env).unwrap()),
            "{key}"
        );
        let e = errors(&with("\"yes\""));
        let found: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(found, [format!("server.{key}")]);
    }
}

#[test]
fn upstream_and_cancel_budgets_have_defaults_and_named_errors() {
    let config = Config::parse(VALID, &env).unwrap();
    assert_eq!(config.server.upstream_max_connections, 256);
    assert_eq!(config.server.upstream_idle_timeout, Duration::from_secs(30));
    assert_eq!(config.server.limits.max_cancelled_streams, 100);
    assert_eq!(
        config.server.limits.cancelled_streams_window,
        Duration::from_secs(10)
    );
    assert_eq!(config.routes[0].max_connections, None);
    let text = format!(
        "[server]\nupstream_max_connections = 0\nmax_cancelled_streams = -1\ncancelled_streams_window = \"0s\"\n{VALID}max_connections = 0\n"
    );
    assert_eq!(
        keys(&text),
        [
            "server.max_cancelled_streams",
            "server.upstream_max_connections",
            "server.cancelled_streams_window",
            "routes[0].max_connections",
        ]
    );
    let text = format!("{VALID}max_connections = 8\n");
    assert_eq!(
        Config::parse(&text, &env).unwrap().routes[0].max_connections,
        Some(8)
    );
}

#[test]
fn access_rules_are_read_and_bad_ones_named() {
    let text = format!(
        "{VALID}[routes.access]\nnetworks = [\"10.0.0.0/8\", \"::1\"]\nmethods = [\"get\", \"POST\"]\npaths = [\"/graphql\"]\nheader = \"x-proxy-key\"\nheader_value_env = \"SECRET\"\n"
    );
    let access = &Config::parse(&text, &env).unwrap().routes[0].access;
    assert_eq!(access.networks.len(), 2);
    assert_eq!(access.methods, [http::Method::GET, http::Method::POST]);
    assert_eq!(access.marker.as_ref().unwrap().0, "x-proxy-key");
    assert!(
        !format!("{access:?}").contains("s3cr3t"),
        "the marker value is a secret"
    );

    let bad = format!(
        "{VALID}[routes.access]\nnetworks = [\"lan\"]\nmethods = [\"G E T\"]\npaths = [\"graphql\"]\nheader = \"x-proxy-key\"\nheader_value_env = \"MISSING\"\ncolour = 1\n"
    );
    assert_eq!(
        keys(&bad),
        [
            "routes[0].access.colour",
            "routes[0].access.networks",
            "routes[0].access.methods",
            "routes[0].access.paths",
            "routes[0].access.header_value_env",
        ]
    );
}

#[test]
fn a_listener_off_loopback_with_an_open_route_is_warned_about() {
    let open = VALID.replace(
        "[[routes]]",
        "[server]\nlisten = \"0.0.0.0:8080\"\n[[routes]]",
    );
    let warnings = Config::parse(&open, &env).unwrap().warnings;
    assert!(warnings[0].contains("routes[0]"), "{warnings:?}");
    let guarded = format!("{open}[routes.access]\nnetworks = [\"10.0.0.0/8\"]\n");
    assert!(Config::parse(&guarded, &env).unwrap().warnings.is_empty());
    assert!(Config::parse(VALID, &env).unwrap().warnings.is_empty());
}

#[test]
fn h2c_is_for_plain_http_upstreams() {
    let https = format!("{VALID}h2c = true\n");
    assert_eq!(keys(&https), ["routes[0].h2c"]);
    let http = https.replace("https://media.example", "http://media.internal:3000");
    assert!(Config::parse(&http, &env).unwrap().routes[0].h2c);
}

#[test]
fn upstream_tls_tables_are_checked() {
    let text = format!(
        "{VALID}[routes.tls]\nca_file = \"/nonexistent/ca.pem\"\nclient_cert_file = \"/nonexistent/c.pem\"\nserver_name = \"not a name\"\n"
    );
    assert_eq!(
        keys(&text),
        [
            "routes[0].tls.client_key_file",
            "routes[0].tls.server_name",
            "routes[0].tls.ca_file",
        ]
    );
    let plain = VALID.replace("https://media.example", "http://media.internal");
    let text = format!("{plain}[routes.tls]\nserver_name = \"media.internal\"\n");
    assert_eq!(keys(&text), ["routes[0].tls"]);
    let identity = format!("[identity.tls]\nca_file = \"/nonexistent/ca.pem\"\n{VALID}");
    assert_eq!(keys(&identity), ["identity.tls.ca_file"]);
}

#[test]
fn further_listeners_are_checked() {
    let text = format!(
        "[listeners.a]\nlisten = \"127.0.0.1:8081\"\n[listeners.b]\nsocket = \"/tmp/x.sock\"\nlisten = \"127.0.0.1:8082\"\n[listeners.c]\nsocket = \"/tmp/c.sock\"\nsocket_mode = \"rw\"\n{VALID}listener = \"nowhere\"\n"
    );
    assert_eq!(
        keys(&text),
        [
            "listeners.b.socket",
            "listeners.c.socket_mode",
            "routes[0].listener"
        ]
    );
    let text = format!("[listeners.a]\nlisten = \"0.0.0.0:8081\"\n{VALID}listener = \"a\"\n");
    let config = Config::parse(&text, &env).unwrap();
    assert_eq!(config.routes[0].listener, Some(0));
    assert!(
        config.warnings[0].contains("0.0.0.0:8081"),
        "{:?}",
        config.warnings
    );
}

fn overridden(vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::parse_with_overrides(VALID, &env, &vars)
}

#[test]
fn environment_overrides_win_over_the_file_and_are_validated_like_it() {
    let config = overridden(&[
        ("MOSAIC_AUTH_PROXY__SERVER__LISTEN", "0.0.0.0:9090"),
        ("MOSAIC_AUTH_PROXY__SERVER__MAX_HEADERS", "50"),
        ("MOSAIC_AUTH_PROXY__SERVER__ACCESS_LOG", "true"),
        ("MOSAIC_AUTH_PROXY__IDENTITY__REFRESH_AT", "0.5"),
        ("MOSAIC_AUTH_PROXY__ACCOUNTS__MEDIA__CLIENT_ID", "from-env"),
        (
            "MOSAIC_AUTH_PROXY__ROUTES__0__UPSTREAM",
            "https://other.example",
        ),
        ("MOSAIC_AUTH_PROXY__ROUTES__0__UPGRADES", "[]"),
        ("OTHER__SERVER__LISTEN", "ignored"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:9090");
    assert_eq!(config.server.limits.max_headers, 50);
    assert!(config.server.access_log);
    assert_eq!(config.identity.refresh.fraction, 0.5);
    assert_eq!(config.accounts[0].client_id, "from-env");
    assert_eq!(
        config.routes[0].upstream.to_string(),
        "https://other.example"
    );
    assert!(config.routes[0].upgrades.is_empty());
}

#[test]
fn unknown_or_bad_overrides_are_refused_naming_the_variable() {
    let errors = overridden(&[
        ("MOSAIC_AUTH_PROXY__SERVER__LISTN", "0.0.0.0:9090"),
        ("MOSAIC_AUTH_PROXY__SERVR__LISTEN", "0.0.0.0:9090"),
        ("MOSAIC_AUTH_PROXY__SERVER__MAX_HEADERS", "many"),
        (
            "MOSAIC_AUTH_PROXY__ROUTES__7__UPSTREAM",
            "https://x.example",
        ),
    ])
    .expect_err("the overrides are refused");
    let text = errors.to_string();
    for (key, var) in [
        ("server.listn", "MOSAIC_AUTH_PROXY__SERVER__LISTN"),
        ("servr", "MOSAIC_AUTH_PROXY__SERVR__LISTEN"),
        (
            "server.max_headers",
            "MOSAIC_AUTH_PROXY__SERVER__MAX_HEADERS",
        ),
    ] {
        let error = errors
            .0
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no error for {key}: {text}"));
        assert!(error.problem.contains(var), "{text}");
    }
    assert!(
        errors
            .0
            .iter()
            .any(|e| e.key == "MOSAIC_AUTH_PROXY__ROUTES__7__UPSTREAM"),
        "{text}"
    );
}
