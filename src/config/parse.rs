//! Stage two: each table of the file walked key by key into the validated types.

use super::section::Section;
use super::{
    default_workers, DEFAULT_CANCELLED_STREAMS_WINDOW, DEFAULT_MAX_CANCELLED_STREAMS,
    DEFAULT_TLS_RELOAD, DEFAULT_UPSTREAM_MAX_CONNECTIONS, MAX_WORKERS,
};
use super::{
    AccessRules, ConnectionLimits, ForwardingHeaders, ListenAddress, ListenerConfig,
    DEFAULT_BODY_TIMEOUT, DEFAULT_H2_CONNECTION_WINDOW, DEFAULT_H2_MAX_CONCURRENT_STREAMS,
    DEFAULT_H2_STREAM_WINDOW, DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_URI_BYTES, DEFAULT_REPLAY_MEMORY,
    DEFAULT_TUNNEL_IDLE_TIMEOUT, DEFAULT_WRITE_TIMEOUT,
};
use super::{
    AccountConfig, ConfigError, EnvLookup, IdentityConfig, RouteConfig, SecretSource, ServerConfig,
    TlsConfig, Upstream, DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDENTITY_ORIGIN,
    DEFAULT_IDENTITY_TIMEOUT, DEFAULT_LISTEN, DEFAULT_MAX_REPLY_BYTES, DEFAULT_MIN_BODY_RATE,
    DEFAULT_REPLAY_BODY_LIMIT, DEFAULT_SHUTDOWN_GRACE, DEFAULT_TOKEN_WAIT,
    DEFAULT_UPSTREAM_IDLE_TIMEOUT, DEFAULT_UPSTREAM_TIMEOUT,
};
use crate::identity::breaker::BreakerPolicy;
use crate::identity::refresh::{RefreshPolicy, RetryPolicy};
use crate::identity::refresher::DEFAULT_SECRET_POLL;
use crate::secret::{read_secret_file, Secret};
use http::uri::{Authority, Scheme};
use http::Uri;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn parse_listener_tls(
    s: &mut Section<'_>,
    warnings: &mut Vec<String>,
) -> Option<crate::tls::ListenerTls> {
    let cert = s.string("tls_cert_file");
    let key = s.string("tls_key_file");
    let client_ca = s.string("tls_client_ca_file");
    let auth = s.string("tls_client_auth");
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            for (key, given) in [
                ("tls_client_ca_file", client_ca.is_some()),
                ("tls_client_auth", auth.is_some()),
            ] {
                if given {
                    s.error(
                        key,
                        "is given without tls_cert_file and tls_key_file",
                        "set both to serve TLS, or remove it",
                    );
                }
            }
            return None;
        }
        (Some(_), None) => {
            s.error(
                "tls_key_file",
                "is missing",
                "set it to the PEM private key of tls_cert_file",
            );
            return None;
        }
        (None, Some(_)) => {
            s.error(
                "tls_cert_file",
                "is missing",
                "set it to the PEM certificate chain of tls_key_file",
            );
            return None;
        }
    };
    let client_auth_required = match auth {
        None | Some("required") => true,
        Some("optional") => false,
        Some(other) => {
            s.error(
                "tls_client_auth",
                format!("{other:?} is not a client certificate policy"),
                "write \"required\" or \"optional\" (then a route's access.client_cert decides)",
            );
            true
        }
    };
    if auth.is_some() && client_ca.is_none() {
        s.error(
            "tls_client_auth",
            "is given without tls_client_ca_file",
            "name the CA bundle client certificates must chain to",
        );
    }
    let tls = crate::tls::ListenerTls {
        cert_file: PathBuf::from(cert),
        key_file: PathBuf::from(key),
        client_ca_file: client_ca.map(PathBuf::from),
        client_auth_required,
    };
    match crate::tls::server_config(&tls) {
        Ok((_, found)) => warnings.extend(
            found
                .into_iter()
                .map(|w| format!("server.tls_cert_file: {w}")),
        ),
        Err(problem) => {
            s.error(
                "tls_cert_file",
                format!("cannot serve TLS: {problem}"),
                "point tls_cert_file, tls_key_file and tls_client_ca_file at matching PEM files",
            );
            return None;
        }
    }
    Some(tls)
}

pub(super) fn parse_server(
    table: &toml::Table,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> ServerConfig {
    let mut s = Section::new(
        "server",
        table,
        &[
            "listen",
            "admin_listen",
            "upstream_timeout",
            "connect_timeout",
            "upstream_idle_timeout",
            "shutdown_grace",
            "token_wait",
            "replay_body_limit",
            "replay_memory",
            "body_timeout",
            "min_body_rate",
            "max_uri_bytes",
            "trusted_proxies",
            "forwarding_headers",
            "tunnel_idle_timeout",
            "max_connections",
            "header_timeout",
            "idle_timeout",
            "write_timeout",
            "max_header_bytes",
            "max_headers",
            "h2_max_concurrent_streams",
            "h2_stream_window",
            "h2_connection_window",
            "upstream_max_connections",
            "max_cancelled_streams",
            "cancelled_streams_window",
            "tls_cert_file",
            "tls_key_file",
            "tls_client_ca_file",
            "tls_client_auth",
            "tls_reload",
            "access_log",
            "workers",
            "defer_accept",
            "quickack",
        ],
    );
    let listen = s
        .socket_addr("listen")
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("the default address parses"));
    let max_connections = s
        .typed_integer("max_connections", (1, 1_000_000))
        .map(|n| n as usize);
    let limits = ConnectionLimits {
        max_connections,
        header_timeout: s.duration("header_timeout", DEFAULT_HEADER_TIMEOUT),
        idle_timeout: s.duration("idle_timeout", DEFAULT_IDLE_TIMEOUT),
        write_timeout: s.duration("write_timeout", DEFAULT_WRITE_TIMEOUT),
        max_header_bytes: s.integer(
            "max_header_bytes",
            DEFAULT_MAX_HEADER_BYTES as u64,
            (8 * 1024, 1024 * 1024),
        ) as usize,
        max_headers: s.integer("max_headers", DEFAULT_MAX_HEADERS as u64, (8, 1000)) as usize,
        h2_max_concurrent_streams: s.integer(
            "h2_max_concurrent_streams",
            DEFAULT_H2_MAX_CONCURRENT_STREAMS.into(),
            (1, 1000),
        ) as u32,
        h2_stream_window: s.integer(
            "h2_stream_window",
            DEFAULT_H2_STREAM_WINDOW.into(),
            (65_535, 16 * 1024 * 1024),
        ) as u32,
        h2_connection_window: s.integer(
            "h2_connection_window",
            DEFAULT_H2_CONNECTION_WINDOW.into(),
            (65_535, 64 * 1024 * 1024),
        ) as u32,
        max_cancelled_streams: s.integer(
            "max_cancelled_streams",
            DEFAULT_MAX_CANCELLED_STREAMS.into(),
            (1, 1_000_000),
        ) as u32,
        cancelled_streams_window: s
            .duration("cancelled_streams_window", DEFAULT_CANCELLED_STREAMS_WINDOW),
    };
    let trusted_proxies = s
        .string_list("trusted_proxies")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|text| match parse_network(text) {
            Some(net) => Some(net),
            None => {
                s.error(
                    "trusted_proxies",
                    format!("{text:?} is not an address or network"),
                    "write addresses or CIDR networks, such as \"10.0.0.0/8\" or \"::1\"",
                );
                None
            }
        })
        .collect();
    let mut forwarding_headers = ForwardingHeaders::ALL;
    if let Some(names) = s.string_list("forwarding_headers") {
        forwarding_headers = ForwardingHeaders::NONE;
        for name in names {
            match ForwardingHeaders::named(name) {
                Some(header) => forwarding_headers = forwarding_headers.with(header),
                None => {
                    let names: Vec<String> = ForwardingHeaders::NAMES
                        .iter()
                        .map(|name| format!("{name:?}"))
                        .collect();
                    s.error(
                        "forwarding_headers",
                        format!("{name:?} is not a forwarding header the proxy sets"),
                        format!("list some of {}, or [] for none", names.join(", ")),
                    )
                }
            }
        }
    }
    let tls = parse_listener_tls(&mut s, warnings);
    let config = ServerConfig {
        listen,
        admin_listen: s.socket_addr("admin_listen"),
        upstream_timeout: s.duration("upstream_timeout", DEFAULT_UPSTREAM_TIMEOUT),
        connect_timeout: s.duration("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        upstream_idle_timeout: s.duration("upstream_idle_timeout", DEFAULT_UPSTREAM_IDLE_TIMEOUT),
        shutdown_grace: s.duration("shutdown_grace", DEFAULT_SHUTDOWN_GRACE),
        token_wait: s.duration("token_wait", DEFAULT_TOKEN_WAIT),
        replay_body_limit: s.integer(
            "replay_body_limit",
            DEFAULT_REPLAY_BODY_LIMIT,
            (0, 16 * 1024 * 1024),
        ),
        replay_memory: s.integer(
            "replay_memory",
            DEFAULT_REPLAY_MEMORY,
            (0, 16 * 1024 * 1024 * 1024),
        ),
        body_timeout: s.duration("body_timeout", DEFAULT_BODY_TIMEOUT),
        min_body_rate: s.integer("min_body_rate", DEFAULT_MIN_BODY_RATE, (0, 1 << 30)),
        max_uri_bytes: s.integer("max_uri_bytes", DEFAULT_MAX_URI_BYTES as u64, (256, 65_534))
            as usize,
        trusted_proxies,
        forwarding_headers,
        tunnel_idle_timeout: s.duration("tunnel_idle_timeout", DEFAULT_TUNNEL_IDLE_TIMEOUT),
        tls,
        tls_reload: s.duration("tls_reload", DEFAULT_TLS_RELOAD),
        access_log: s.bool("access_log", false),
        defer_accept: s.bool("defer_accept", false),
        quickack: s.bool("quickack", false),
        workers: s.integer("workers", default_workers() as u64, (1, MAX_WORKERS)) as usize,
        upstream_max_connections: s.integer(
            "upstream_max_connections",
            DEFAULT_UPSTREAM_MAX_CONNECTIONS as u64,
            (1, 100_000),
        ) as usize,
        limits,
    };
    for (key, value) in [
        ("upstream_timeout", config.upstream_timeout),
        ("connect_timeout", config.connect_timeout),
        ("body_timeout", config.body_timeout),
        ("tunnel_idle_timeout", config.tunnel_idle_timeout),
        ("header_timeout", config.limits.header_timeout),
        ("idle_timeout", config.limits.idle_timeout),
        ("write_timeout", config.limits.write_timeout),
        (
            "cancelled_streams_window",
            config.limits.cancelled_streams_window,
        ),
    ] {
        if value.is_zero() {
            s.error(key, "is zero", "use a positive duration such as \"30s\"");
        }
    }
    if config.limits.h2_connection_window < config.limits.h2_stream_window {
        s.error(
            "h2_connection_window",
            "is smaller than server.h2_stream_window",
            "make the connection window at least as large as the stream window",
        );
    }
    if config.replay_memory > 0 && config.replay_memory < config.replay_body_limit {
        s.error(
            "replay_memory",
            "is smaller than server.replay_body_limit, so no body could ever be kept",
            "make replay_memory at least replay_body_limit, or set replay_body_limit = 0",
        );
    }
    errors.extend(s.errors);
    config
}

/// Parses `"10.0.0.0/8"`, `"::1"` or `"192.168.1.7"` (a single address is a /32 or /128).
fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        })
        .map(|net| net.trunc())
}

pub(super) fn parse_identity(
    table: &toml::Table,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> IdentityConfig {
    let mut s = Section::new(
        "identity",
        table,
        &[
            "origin",
            "timeout",
            "max_reply_bytes",
            "refresh_at",
            "refresh_margin",
            "expiry_margin",
            "refresh_jitter",
            "retry_initial",
            "retry_max",
            "permanent_retry",
            "breaker_threshold",
            "breaker_cooldown",
            "secret_poll",
            "tls",
        ],
    );
    let defaults_breaker = BreakerPolicy::default();
    let defaults_refresh = RefreshPolicy::default();
    let defaults_retry = RetryPolicy::default();
    let origin = s.string("origin").unwrap_or(DEFAULT_IDENTITY_ORIGIN);
    let origin = match parse_base_url(origin) {
        Ok((scheme, authority, path)) => {
            if !path.is_empty() {
                warnings.push(format!(
                    "identity.origin: the path {path:?} is ignored; the token request goes to {scheme}://{authority}/graphql"
                ));
            }
            if scheme == Scheme::HTTP && !is_loopback(authority.host()) {
                warnings.push(format!(
                    "identity.origin: {authority} is reached over plain http, so client secrets and tokens cross the network unencrypted; use https"
                ));
            }
            format!("{scheme}://{authority}")
        }
        Err(problem) => {
            s.error(
                "origin",
                problem,
                "write the identity service's origin, such as \"https://id.service.eu.axinom.net\"",
            );
            String::new()
        }
    };
    let config = IdentityConfig {
        origin,
        timeout: s.duration("timeout", DEFAULT_IDENTITY_TIMEOUT),
        max_reply_bytes: s.integer(
            "max_reply_bytes",
            DEFAULT_MAX_REPLY_BYTES,
            (1024, 16 * 1024 * 1024),
        ),
        refresh: RefreshPolicy {
            fraction: s.fraction("refresh_at", defaults_refresh.fraction, (0.1, 0.95)),
            refresh_margin: s.duration("refresh_margin", defaults_refresh.refresh_margin),
            expiry_margin: s.duration("expiry_margin", defaults_refresh.expiry_margin),
            jitter: s.fraction("refresh_jitter", defaults_refresh.jitter, (0.0, 0.25)),
        },
        retry: RetryPolicy {
            initial: s.duration("retry_initial", defaults_retry.initial),
            max: s.duration("retry_max", defaults_retry.max),
            permanent: s.duration("permanent_retry", defaults_retry.permanent),
        },
        breaker: BreakerPolicy {
            threshold: s.integer(
                "breaker_threshold",
                defaults_breaker.threshold.into(),
                (1, 100),
            ) as u32,
            cooldown: s.duration("breaker_cooldown", defaults_breaker.cooldown),
        },
        secret_poll: s.duration("secret_poll", DEFAULT_SECRET_POLL),
        tls: s
            .table("tls")
            .map(|table| parse_upstream_tls("identity.tls", table, errors))
            .unwrap_or_default(),
    };
    if config.secret_poll < std::time::Duration::from_millis(10) {
        s.error(
            "secret_poll",
            "is shorter than 10ms",
            "use a duration such as \"5s\"",
        );
    }
    if config.timeout.is_zero() {
        s.error(
            "timeout",
            "is zero",
            "use a positive duration such as \"10s\"",
        );
    }
    if config.retry.initial.is_zero() {
        s.error(
            "retry_initial",
            "is zero",
            "use a positive duration such as \"500ms\"",
        );
    }
    if config.retry.max < config.retry.initial {
        s.error(
            "retry_max",
            "is shorter than identity.retry_initial",
            "make retry_max at least as long as retry_initial",
        );
    }
    if config.retry.permanent < config.retry.initial {
        s.error(
            "permanent_retry",
            "is shorter than identity.retry_initial",
            "make permanent_retry at least as long as retry_initial",
        );
    }
    errors.extend(s.errors);
    config
}

pub(super) fn parse_tls(table: &toml::Table, errors: &mut Vec<ConfigError>) -> TlsConfig {
    let mut s = Section::new("tls", table, &["native_roots", "ca_file"]);
    let ca_file = s.string("ca_file").map(PathBuf::from);
    if let Some(path) = &ca_file {
        if let Err(problem) = crate::tls::read_ca_file(path) {
            s.error(
                "ca_file",
                format!("names {}, which {problem}", path.display()),
                "point it at a PEM file of CA certificates",
            );
        }
    }
    let config = TlsConfig {
        native_roots: s.bool("native_roots", false),
        ca_file,
    };
    errors.extend(s.errors);
    config
}

pub(super) fn parse_accounts(
    table: &toml::Table,
    env: EnvLookup<'_>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Vec<AccountConfig> {
    let mut accounts = Vec::new();
    if table.is_empty() {
        errors.push(ConfigError {
            key: "accounts".into(),
            problem: "names no account".into(),
            fix: "add a table [accounts.NAME] with client_id and client_secret_env".into(),
        });
    }
    for (name, value) in table {
        let path = format!("accounts.{name}");
        let Some(t) = value.as_table() else {
            errors.push(ConfigError {
                key: path,
                problem: format!("must be a table, found a {}", value.type_str()),
                fix: format!("write it as [accounts.{name}] with client_id and client_secret_env"),
            });
            continue;
        };
        let mut s = Section::new(
            path,
            t,
            &[
                "client_id",
                "client_secret_env",
                "client_secret_file",
                "client_secret",
            ],
        );
        let client_id = s.required_string(
            "client_id",
            "set it to the service account's Client ID from the Mosaic management system",
        );
        if client_id.is_some_and(|id| id.trim().is_empty()) {
            s.error(
                "client_id",
                "is empty",
                "set it to the service account's Client ID",
            );
        }
        let secret = resolve_secret(&mut s, name, env, warnings);
        if let (Some(client_id), Some((secret, secret_source))) = (client_id, secret) {
            accounts.push(AccountConfig {
                name: name.clone(),
                client_id: client_id.trim().to_string(),
                secret,
                secret_source,
            });
        }
        errors.extend(s.errors);
    }
    accounts
}

fn resolve_secret(
    s: &mut Section<'_>,
    name: &str,
    env: EnvLookup<'_>,
    warnings: &mut Vec<String>,
) -> Option<(Secret, SecretSource)> {
    let from_env = s.string("client_secret_env");
    let from_file = s.string("client_secret_file");
    let inline = s.string("client_secret");
    let given = [from_env.is_some(), from_file.is_some(), inline.is_some()];
    match given.iter().filter(|g| **g).count() {
        0 => {
            s.error(
                "client_secret_env",
                "is missing (no client secret is configured)",
                "name the environment variable that holds the secret, or set client_secret_file",
            );
            return None;
        }
        1 => {}
        _ => {
            s.error(
                "client_secret_env",
                "is given together with another client_secret key",
                "keep exactly one of client_secret_env, client_secret_file and client_secret",
            );
            return None;
        }
    }
    if let Some(var) = from_env {
        return match env(var) {
            Some(value) if !value.trim().is_empty() => {
                Some((Secret::new(value.trim()), SecretSource::Env(var.into())))
            }
            Some(_) => {
                s.error(
                    "client_secret_env",
                    format!("names {var}, which is empty"),
                    format!("put the account's client secret in {var}"),
                );
                None
            }
            None => {
                s.error(
                    "client_secret_env",
                    format!("names {var}, which is not set"),
                    format!("export {var} with the account's client secret"),
                );
                None
            }
        };
    }
    if let Some(file) = from_file {
        let path = PathBuf::from(file);
        return match read_secret_file(&path) {
            Ok(secret) => Some((secret, SecretSource::File(path))),
            Err(problem) => {
                s.error(
                    "client_secret_file",
                    problem,
                    "point it at a readable file that holds only the client secret",
                );
                None
            }
        };
    }
    let value = inline.unwrap_or_default();
    if value.trim().is_empty() {
        s.error(
            "client_secret",
            "is empty",
            "use client_secret_env or client_secret_file instead",
        );
        return None;
    }
    warnings.push(format!(
        "accounts.{name}.client_secret is written in the configuration file; prefer client_secret_env or client_secret_file"
    ));
    Some((Secret::new(value.trim()), SecretSource::Inline))
}

pub(super) fn parse_listeners(
    table: &toml::Table,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Vec<ListenerConfig> {
    let mut listeners = Vec::new();
    for (name, value) in table {
        let path = format!("listeners.{name}");
        let Some(t) = value.as_table() else {
            errors.push(ConfigError {
                key: path,
                problem: format!("must be a table, found a {}", value.type_str()),
                fix: format!("write it as [listeners.{name}] with listen or socket"),
            });
            continue;
        };
        let mut s = Section::new(
            path,
            t,
            &[
                "listen",
                "socket",
                "socket_mode",
                "tls_cert_file",
                "tls_key_file",
                "tls_client_ca_file",
                "tls_client_auth",
            ],
        );
        let tcp = s.socket_addr("listen");
        let socket = s.string("socket").map(PathBuf::from);
        let mode = s.string("socket_mode").map_or(Some(0o660), |m| {
            let parsed = u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777);
            if parsed.is_none() {
                s.error(
                    "socket_mode",
                    format!("{m:?} is not an octal file mode"),
                    "write it as \"0660\"",
                );
            }
            parsed
        });
        let tls = parse_listener_tls(&mut s, warnings);
        let address = match (tcp, socket) {
            (Some(addr), None) => Some(ListenAddress::Tcp(addr)),
            (None, Some(path)) => {
                if tls.is_some() {
                    s.error(
                        "tls_cert_file",
                        "is set for a Unix socket",
                        "remove the tls keys: the socket's file mode guards who connects",
                    );
                }
                Some(ListenAddress::Unix {
                    path,
                    mode: mode.unwrap_or(0o660),
                })
            }
            (None, None) => {
                s.error(
                    "listen",
                    "is missing",
                    "give an address such as \"127.0.0.1:8081\", or a socket path",
                );
                None
            }
            (Some(_), Some(_)) => {
                s.error(
                    "socket",
                    "is given together with listen",
                    "keep one of listen and socket",
                );
                None
            }
        };
        if let Some(address) = address {
            listeners.push(ListenerConfig {
                name: name.clone(),
                address,
                tls,
            });
        }
        errors.extend(s.errors);
    }
    listeners
}

pub(super) fn parse_routes(
    list: &[toml::Value],
    accounts: &[&str],
    listeners: &[&str],
    env: EnvLookup<'_>,
    errors: &mut Vec<ConfigError>,
) -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    if list.is_empty() {
        errors.push(ConfigError {
            key: "routes".into(),
            problem: "is empty".into(),
            fix: "add at least one [[routes]] with upstream and account".into(),
        });
    }
    let mut seen: BTreeMap<(Option<usize>, Option<String>, String), usize> = BTreeMap::new();
    for (i, value) in list.iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(t) = value.as_table() else {
            errors.push(ConfigError {
                key: path,
                problem: format!("must be a table, found a {}", value.type_str()),
                fix: "write each route as a [[routes]] table".into(),
            });
            continue;
        };
        let mut s = Section::new(
            path,
            t,
            &[
                "host",
                "path_prefix",
                "upstream",
                "strip_prefix",
                "replay",
                "allow_encoded_slashes",
                "upgrades",
                "max_connections",
                "access",
                "h2c",
                "tls",
                "listener",
                "account",
            ],
        );
        let host = s.string("host").and_then(|h| match normalize_host(h) {
            Some(h) => Some(h),
            None => {
                s.error(
                    "host",
                    format!("{h:?} is not a host name"),
                    "write a host name without scheme or path, such as \"media.example.com\"",
                );
                None
            }
        });
        let prefix = s.string("path_prefix").unwrap_or("/");
        let path_prefix = match normalize_prefix(prefix) {
            Some(p) => p,
            None => {
                s.error(
                    "path_prefix",
                    format!("{prefix:?} is not a path"),
                    "start it with \"/\", such as \"/media\"",
                );
                "/".into()
            }
        };
        let upstream = s
            .required_string(
                "upstream",
                "set the upstream base URL, such as \"https://media.service.eu.axinom.net\"",
            )
            .and_then(|u| match parse_base_url(u) {
                Ok((scheme, authority, base_path)) => Some(Upstream {
                    scheme,
                    authority,
                    base_path,
                }),
                Err(problem) => {
                    s.error(
                        "upstream",
                        problem,
                        "write an http:// or https:// URL, such as \"https://media.service.eu.axinom.net\"",
                    );
                    None
                }
            });
        let strip_prefix = s.bool("strip_prefix", false);
        let replay = s.bool("replay", true);
        let allow_encoded_slashes = s.bool("allow_encoded_slashes", false);
        let max_connections = s
            .typed_integer("max_connections", (1, 100_000))
            .map(|n| n as usize);
        let tls = s
            .table("tls")
            .map(|table| parse_upstream_tls(&format!("routes[{i}].tls"), table, errors));
        if tls.is_some() && upstream.as_ref().is_some_and(|u| u.scheme != Scheme::HTTPS) {
            s.error(
                "tls",
                "is set for a plain http:// upstream",
                "use an https:// upstream, or remove the tls table",
            );
        }
        let listener = s.string("listener").and_then(|name| {
            match listeners.iter().position(|l| *l == name) {
                Some(i) => Some(i),
                None => {
                    s.error(
                        "listener",
                        format!("names {name:?}, which is not a configured listener"),
                        "name one of the [listeners.NAME] tables, or remove it for the main listener",
                    );
                    None
                }
            }
        });
        let h2c = s.bool("h2c", false);
        if h2c && upstream.as_ref().is_some_and(|u| u.scheme == Scheme::HTTPS) {
            s.error(
                "h2c",
                "is set for an https:// upstream",
                "remove it: over TLS, HTTP/2 is agreed by ALPN on its own",
            );
        }
        let access = match s.table("access") {
            Some(table) => parse_access(&format!("routes[{i}].access"), table, env, errors),
            None => AccessRules::default(),
        };
        let upgrades = match s.string_list("upgrades") {
            None => vec!["websocket".to_owned()],
            Some(list) => {
                let mut upgrades = Vec::new();
                for name in list {
                    if name.is_empty() || !name.bytes().all(is_token_byte) {
                        s.error(
                            "upgrades",
                            format!("{name:?} is not a protocol name"),
                            "list Upgrade protocol names such as \"websocket\", or [] for none",
                        );
                    } else {
                        upgrades.push(name.to_ascii_lowercase());
                    }
                }
                upgrades
            }
        };
        let account = s
            .required_string("account", "name one of the [accounts.NAME] tables")
            .and_then(|name| match accounts.iter().position(|a| *a == name) {
                Some(i) => Some(i),
                None => {
                    s.error(
                        "account",
                        format!("names {name:?}, which is not a configured account"),
                        format!("use one of: {}", accounts.join(", ")),
                    );
                    None
                }
            });
        if let Some(first) = seen.insert((listener, host.clone(), path_prefix.clone()), i) {
            s.error(
                "path_prefix",
                format!("repeats the host and path_prefix of routes[{first}]"),
                "remove one of the two routes or make them differ",
            );
        }
        if let (Some(upstream), Some(account)) = (upstream, account) {
            routes.push(RouteConfig {
                host,
                path_prefix,
                upstream,
                strip_prefix,
                replay,
                allow_encoded_slashes,
                upgrades,
                max_connections,
                access,
                h2c,
                tls,
                listener_name: listener.map(|l| listeners[l].to_owned()),
                listener,
                account,
            });
        }
        errors.extend(s.errors);
    }
    routes
}

/// Tells whether `b` may stand in an HTTP token (RFC 9110 §5.6.2), such as a protocol name.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_access(
    path: &str,
    table: &toml::Table,
    env: EnvLookup<'_>,
    errors: &mut Vec<ConfigError>,
) -> AccessRules {
    let mut s = Section::new(
        path,
        table,
        &[
            "networks",
            "methods",
            "paths",
            "header",
            "header_value_env",
            "header_value_file",
            "header_value",
            "client_cert",
        ],
    );
    let mut rules = AccessRules {
        client_cert: s
            .string_list("client_cert")
            .unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        ..AccessRules::default()
    };
    for text in s.string_list("networks").unwrap_or_default() {
        match parse_network(text) {
            Some(net) => rules.networks.push(net),
            None => s.error(
                "networks",
                format!("{text:?} is not an address or network"),
                "write CIDR networks or addresses, such as \"10.0.0.0/8\" or \"fd00::/8\"",
            ),
        }
    }
    for text in s.string_list("methods").unwrap_or_default() {
        match http::Method::from_bytes(text.trim().to_ascii_uppercase().as_bytes()) {
            Ok(method) => rules.methods.push(method),
            Err(_) => s.error(
                "methods",
                format!("{text:?} is not an HTTP method"),
                "list methods such as \"GET\" and \"POST\"",
            ),
        }
    }
    for text in s.string_list("paths").unwrap_or_default() {
        if text.starts_with('/') && !text.contains(['?', '#', ' ']) {
            rules.paths.push(text.to_owned());
        } else {
            s.error(
                "paths",
                format!("{text:?} is not a path pattern"),
                "write paths below the route's prefix, such as \"/graphql\" or \"/files/**\"",
            );
        }
    }
    if let Some(name) = s.string("header") {
        let value = match (
            s.string("header_value_env"),
            s.string("header_value_file"),
            s.string("header_value"),
        ) {
            (Some(var), None, None) => match env(var) {
                Some(v) if !v.trim().is_empty() => Some(Secret::new(v.trim())),
                _ => {
                    s.error(
                        "header_value_env",
                        format!("names {var}, which is not set or empty"),
                        format!("export {var} with the value clients must send"),
                    );
                    None
                }
            },
            (None, Some(file), None) => match read_secret_file(std::path::Path::new(file)) {
                Ok(secret) => Some(secret),
                Err(problem) => {
                    s.error(
                        "header_value_file",
                        problem,
                        "point it at a readable file that holds only the value",
                    );
                    None
                }
            },
            (None, None, Some(v)) if !v.trim().is_empty() => Some(Secret::new(v.trim())),
            _ => {
                s.error(
                    "header_value_env",
                    "is missing, or given with another header_value key",
                    "give exactly one of header_value_env, header_value_file and header_value",
                );
                None
            }
        };
        match http::HeaderName::from_bytes(name.trim().as_bytes()) {
            Ok(header) => rules.marker = value.map(|v| (header, v)),
            Err(_) => s.error(
                "header",
                format!("{name:?} is not a header name"),
                "name a header such as \"x-proxy-key\"",
            ),
        }
    } else {
        for key in ["header_value_env", "header_value_file", "header_value"] {
            if table.contains_key(key) {
                s.error(
                    key,
                    "is given without header",
                    "name the header with header",
                );
            }
        }
    }
    errors.extend(s.errors);
    rules
}

/// Reads a `tls` table of an upstream (`routes[i].tls`) or of the identity service.
fn parse_upstream_tls(
    path: &str,
    table: &toml::Table,
    errors: &mut Vec<ConfigError>,
) -> crate::tls::UpstreamTls {
    let mut s = Section::new(
        path,
        table,
        &[
            "ca_file",
            "client_cert_file",
            "client_key_file",
            "server_name",
        ],
    );
    let ca_file = s.string("ca_file").map(PathBuf::from);
    let cert = s.string("client_cert_file").map(PathBuf::from);
    let key = s.string("client_key_file").map(PathBuf::from);
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            s.error(
                "client_key_file",
                "is missing",
                "set it to the PEM key of client_cert_file",
            );
            None
        }
        (None, Some(_)) => {
            s.error(
                "client_cert_file",
                "is missing",
                "set it to the PEM certificate of client_key_file",
            );
            None
        }
    };
    let server_name = s.string("server_name").and_then(|name| {
        match rustls_pki_types::ServerName::try_from(name) {
            Ok(_) => Some(name.to_owned()),
            Err(_) => {
                s.error(
                    "server_name",
                    format!("{name:?} is not a DNS name or IP address"),
                    "write the name the upstream's certificate carries, such as \"media.internal\"",
                );
                None
            }
        }
    });
    let tls = crate::tls::UpstreamTls {
        ca_file,
        client_cert,
        server_name,
    };
    if let Err(error) = crate::tls::client_config_for(false, None, &tls) {
        let key = match error {
            crate::tls::TlsError::ClientCert { .. } => "client_cert_file",
            _ => "ca_file",
        };
        s.error(key, error.to_string(), "point it at a readable PEM file");
    }
    errors.extend(s.errors);
    tls
}

fn normalize_host(host: &str) -> Option<String> {
    let host = host.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    // A port, if written, is not part of matching: the Host header's port is ignored too.
    let authority: Authority = host.parse().ok().filter(|_| valid)?;
    Some(authority.host().to_owned())
}

/// Tells whether a host names this machine's loopback interface.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn normalize_prefix(prefix: &str) -> Option<String> {
    if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
        return None;
    }
    let trimmed = prefix.trim_end_matches('/');
    Some(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    })
}

/// Splits an `http(s)://authority/path` base URL; the path comes back without a trailing `/`.
pub(super) fn parse_base_url(text: &str) -> Result<(Scheme, Authority, String), String> {
    let uri: Uri = text.parse().map_err(|_| format!("{text:?} is not a URL"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{text:?} has no scheme"))?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!(
            "{text:?} uses the scheme {scheme}, not http or https"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{text:?} carries user information"));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} carries a query"));
    }
    let path = uri.path().trim_end_matches('/').to_string();
    Ok((scheme, authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::Scheme;

    #[test]
    fn prefixes_lose_their_trailing_slash() {
        assert_eq!(normalize_prefix("/media/").as_deref(), Some("/media"));
        assert_eq!(normalize_prefix("/").as_deref(), Some("/"));
        assert_eq!(normalize_prefix("media"), None);
    }

    #[test]
    fn base_urls_keep_their_path_without_trailing_slash() {
        let (scheme, authority, path) = parse_base_url("https://a.example:8443/v1/").unwrap();
        assert_eq!(scheme, Scheme::HTTPS);
        assert_eq!(authority.as_str(), "a.example:8443");
        assert_eq!(path, "/v1");
        assert!(parse_base_url("ftp://a.example").is_err());
        assert!(parse_base_url("https://user:pw@a.example").is_err());
    }
}
