//! Configuration in two stages: TOML text → a table walked key by key → a validated [`Config`].
//!
//! Every bad key is reported at once, each with its fix. Errors never echo values that may
//! be secret, and never the file's text.

mod overrides;
mod parse;
mod section;

pub use overrides::PREFIX as OVERRIDE_PREFIX;

use crate::identity::breaker::BreakerPolicy;
use crate::identity::refresh::{RefreshPolicy, RetryPolicy};
use crate::secret::Secret;
pub use crate::secret::{read_secret_file, SecretSource};
use http::uri::{Authority, Scheme};
use parse::{
    parse_accounts, parse_identity, parse_listeners, parse_routes, parse_server, parse_tls,
};
use section::Section;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the proxy listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The Mosaic identity service of the EU region.
pub const DEFAULT_IDENTITY_ORIGIN: &str = "https://id.service.eu.axinom.net";
/// How long one token request may take, connect to last byte.
pub const DEFAULT_IDENTITY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the upstream may take to send its response head.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection to an upstream may take to open.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per second a request body must average beyond `body_timeout` of waiting.
pub const DEFAULT_MIN_BODY_RATE: u64 = 240;
/// How long an idle upstream connection is reused at most: below the idle timeouts of the
/// load balancers in front of services (60 s and more) that do not announce theirs.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests in flight.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a request waits for a token that is being fetched before it is answered 503.
pub const DEFAULT_TOKEN_WAIT: Duration = Duration::from_secs(5);
/// The largest identity reply read before it is called broken.
pub const DEFAULT_MAX_REPLY_BYTES: u64 = 64 * 1024;
/// The largest request body kept so that the request can be replayed after a rejection.
pub const DEFAULT_REPLAY_BODY_LIMIT: u64 = 64 * 1024;
/// All request bodies kept for replays together, at most.
pub const DEFAULT_REPLAY_MEMORY: u64 = 64 * 1024 * 1024;
/// From accept, the time a connection has to complete its first request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may sit with no request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest gap between two pieces of a request body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may leave an answer unread.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an upgraded connection (WebSocket) may carry no byte either way.
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest request head (request line and headers), in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// The most header fields a request may carry.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// The longest request target (path and query), in bytes.
pub const DEFAULT_MAX_URI_BYTES: usize = 16 * 1024;
/// Connections to one upstream (and requests in flight to it) at once, unless its route says.
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: usize = 256;
/// Forwarded requests one client connection may cancel within the window before it is told
/// to calm down (HTTP/2 GOAWAY `ENHANCE_YOUR_CALM`).
pub const DEFAULT_MAX_CANCELLED_STREAMS: u32 = 100;
/// The window over which cancelled forwarded requests are counted.
pub const DEFAULT_CANCELLED_STREAMS_WINDOW: Duration = Duration::from_secs(10);
/// The most `server.workers`.
pub const MAX_WORKERS: u64 = 256;

/// Returns the default `server.workers`: one per core this process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How often the listener's certificate files are read again.
pub const DEFAULT_TLS_RELOAD: Duration = Duration::from_secs(10);
/// Concurrent streams one HTTP/2 client connection may open.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 flow-control window of one stream: what a client may send ahead, per stream.
pub const DEFAULT_H2_STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 flow-control window of one connection, all its streams together.
pub const DEFAULT_H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// One bad key: its dotted name, what is wrong and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

/// Every problem found in one configuration, reported together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "the configuration has {n} problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {}: {} (fix: {})", e.key, e.problem, e.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated configuration of a proxy.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub identity: IdentityConfig,
    pub tls: TlsConfig,
    pub accounts: Vec<AccountConfig>,
    pub routes: Vec<RouteConfig>,
    /// Further listeners of `[listeners.NAME]`, each serving only the routes that name it.
    pub listeners: Vec<ListenerConfig>,
    /// Things that work but deserve a word at start-up (an inline secret, a dropped path).
    pub warnings: Vec<String>,
}

/// The `[server]` table.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long an idle upstream connection is reused at most; zero: never.
    pub upstream_idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub token_wait: Duration,
    /// Request bodies up to this size are kept for one replay after a token rejection.
    pub replay_body_limit: u64,
    /// All kept replay bodies together at most; beyond it requests stream without one.
    pub replay_memory: u64,
    /// The longest gap between two pieces of a request body (then 408 or a reset).
    pub body_timeout: Duration,
    /// Bytes per second of waiting a request body must average once it has been waited on
    /// for longer than `body_timeout`; 0: no minimum.
    pub min_body_rate: u64,
    /// The longest request target; longer ones are answered 414.
    pub max_uri_bytes: usize,
    /// Peers whose `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are extended, not replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The forwarding headers the proxy sets on every forwarded request.
    pub forwarding_headers: ForwardingHeaders,
    /// How long an upgraded connection may carry no byte either way.
    pub tunnel_idle_timeout: Duration,
    /// Connections to an upstream at once, for routes that do not set their own.
    pub upstream_max_connections: usize,
    /// What one client connection may hold.
    pub limits: ConnectionLimits,
    /// TLS on the listener; `None`: plain TCP.
    pub tls: Option<crate::tls::ListenerTls>,
    /// How often the listener's certificate files are read again to notice a rotation.
    pub tls_reload: Duration,
    /// One `info` line per request (target `access`).
    pub access_log: bool,
    /// Threads serving the main listener, each with its own runtime and socket.
    pub workers: usize,
    /// Accept a TCP connection only once its first bytes arrived (`TCP_DEFER_ACCEPT`).
    pub defer_accept: bool,
    /// Acknowledge a new connection's first request at once (`TCP_QUICKACK`), not with the
    /// answer.
    pub quickack: bool,
}

/// The bounds on what one client connection may hold, and on how many there are.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionLimits {
    /// Connections served at once; `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    /// From accept, the time to complete the first request head (HTTP/2: preface and a
    /// stream); a later HTTP/1 head has one to two of it from its first byte.
    pub header_timeout: Duration,
    /// How long a connection may have no request in flight before it is closed.
    pub idle_timeout: Duration,
    /// How long a client may leave an answer unread before the connection is dropped.
    pub write_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// Forwarded requests a connection may cancel within `cancelled_streams_window`.
    pub max_cancelled_streams: u32,
    pub cancelled_streams_window: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: None,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_stream_window: DEFAULT_H2_STREAM_WINDOW,
            h2_connection_window: DEFAULT_H2_CONNECTION_WINDOW,
            max_cancelled_streams: DEFAULT_MAX_CANCELLED_STREAMS,
            cancelled_streams_window: DEFAULT_CANCELLED_STREAMS_WINDOW,
        }
    }
}

/// The `[identity]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityConfig {
    /// `scheme://authority` of the identity service; `/graphql` is resolved against it.
    pub origin: String,
    pub timeout: Duration,
    pub max_reply_bytes: u64,
    pub refresh: RefreshPolicy,
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
    /// How often file secrets are read again to notice a rotation.
    pub secret_poll: Duration,
    /// TLS towards the identity service beyond the global `[tls]`.
    pub tls: crate::tls::UpstreamTls,
}

/// The `[tls]` table: how upstreams and the identity service are verified.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TlsConfig {
    /// Trust the operating system's roots in addition to the bundled web PKI roots.
    pub native_roots: bool,
    /// A PEM bundle of further CA certificates to trust (a private CA).
    pub ca_file: Option<PathBuf>,
}

/// One named service account of `[accounts.NAME]`.
#[derive(Clone, Debug)]
pub struct AccountConfig {
    pub name: String,
    pub client_id: String,
    pub secret: Secret,
    pub secret_source: SecretSource,
}

/// One `[[routes]]` entry.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    /// Starts with `/`, no trailing `/` except for the root.
    pub path_prefix: String,
    pub upstream: Upstream,
    pub strip_prefix: bool,
    /// Replay a request once with a fresh token when the upstream refused the token.
    pub replay: bool,
    /// Forward `%2F` and `%5C` in paths as they are instead of refusing them.
    pub allow_encoded_slashes: bool,
    /// The `Upgrade` protocols tunnelled (lower case); any other upgrade is stripped.
    pub upgrades: Vec<String>,
    /// Connections to this route's upstream at once; `None`: `server.upstream_max_connections`.
    pub max_connections: Option<usize>,
    /// Who may borrow the route's account; empty: whoever reaches the listener.
    pub access: AccessRules,
    /// Speak HTTP/2 with prior knowledge (h2c) to an `http://` upstream.
    pub h2c: bool,
    /// TLS towards this route's upstream beyond the global `[tls]`.
    pub tls: Option<crate::tls::UpstreamTls>,
    /// Index into [`Config::listeners`]; `None`: the main listener (`server.listen`).
    pub listener: Option<usize>,
    /// The name of that listener.
    pub listener_name: Option<String>,
    /// Index into [`Config::accounts`].
    pub account: usize,
}

/// One `[listeners.NAME]` table: an address of its own, its own TLS, and the routes that
/// name it.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub address: ListenAddress,
    pub tls: Option<crate::tls::ListenerTls>,
}

/// Where a listener listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    /// A Unix socket path, created with this file mode.
    Unix {
        path: PathBuf,
        mode: u32,
    },
}

/// The `[routes.access]` table: every rule given must hold for a request to be forwarded.
#[derive(Clone, Debug, Default)]
pub struct AccessRules {
    /// Client networks; empty: any.
    pub networks: Vec<ipnet::IpNet>,
    /// Allowed methods; empty: any.
    pub methods: Vec<http::Method>,
    /// Allowed paths below the route's prefix (`*` one segment, a trailing `/**` any rest);
    /// empty: any.
    pub paths: Vec<String>,
    /// A header the client must send with this value; removed before forwarding.
    pub marker: Option<(http::HeaderName, Secret)>,
    /// Client certificate subjects or SANs (DNS, URI) of which one must match; needs TLS
    /// with a client CA on the listener.
    pub client_cert: Vec<String>,
}

impl AccessRules {
    /// Tells whether the route is open to whoever reaches the listener.
    pub fn is_open(&self) -> bool {
        self.networks.is_empty()
            && self.methods.is_empty()
            && self.paths.is_empty()
            && self.marker.is_none()
            && self.client_cert.is_empty()
    }
}

/// An upstream base URL, split into the parts a request is built from.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Empty, or starts with `/` and has no trailing `/`.
    pub base_path: String,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// Looks up an environment variable; tests pass their own instead of touching the process.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Reads and validates the file at `path`, resolving secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: path.display().to_string(),
                problem: format!("cannot be read: {e}"),
                fix: "pass an existing file with --config".into(),
            }])
        })?;
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(OVERRIDE_PREFIX))
            .collect();
        Config::parse_with_overrides(&text, &|name| std::env::var(name).ok(), &vars)
    }

    /// Validates configuration text, looking environment variables up with `env`.
    pub fn parse(text: &str, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
        Config::parse_with_overrides(text, env, &[])
    }

    /// Like [`Config::parse`], with the overrides among `vars` (`MOSAIC_AUTH_PROXY__...`)
    /// applied to the text's table before it is validated.
    pub fn parse_with_overrides(
        text: &str,
        env: EnvLookup<'_>,
        vars: &[(String, String)],
    ) -> Result<Config, ConfigErrors> {
        let mut root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // The parser's own rendering quotes the offending line, which may hold a secret.
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            ConfigErrors(vec![ConfigError {
                key: line.map_or("(file)".into(), |l| format!("line {l}")),
                problem: format!("is not valid TOML: {}", e.message().trim_end()),
                fix: "correct the syntax at that line".into(),
            }])
        })?;
        let (applied, mut errors) = overrides::apply(&mut root, vars);
        let root = root;
        let mut warnings = Vec::new();
        let mut top = Section::new(
            "",
            &root,
            &[
                "server",
                "identity",
                "tls",
                "accounts",
                "routes",
                "listeners",
            ],
        );
        let empty = toml::Table::new();
        let server = parse_server(
            top.table("server").unwrap_or(&empty),
            &mut errors,
            &mut warnings,
        );
        let identity = parse_identity(
            top.table("identity").unwrap_or(&empty),
            &mut errors,
            &mut warnings,
        );
        let tls = parse_tls(top.table("tls").unwrap_or(&empty), &mut errors);
        let accounts = match top.table("accounts") {
            Some(t) => parse_accounts(t, env, &mut errors, &mut warnings),
            None => {
                top.error(
                    "accounts",
                    "is missing",
                    "add a table [accounts.NAME] with client_id and client_secret_env",
                );
                Vec::new()
            }
        };
        // Routes are checked against every account table, valid or not, so a bad account
        // is reported once, not again by each route that names it.
        let account_names: Vec<&str> = root
            .get("accounts")
            .and_then(toml::Value::as_table)
            .map(|t| t.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let listeners = match top.table("listeners") {
            Some(t) => parse_listeners(t, &mut errors, &mut warnings),
            None => Vec::new(),
        };
        let listener_names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
        let routes = match top.array("routes") {
            Some(list) => parse_routes(list, &account_names, &listener_names, env, &mut errors),
            None => {
                if !root.contains_key("routes") {
                    top.error(
                        "routes",
                        "is missing",
                        "add at least one [[routes]] with upstream and account",
                    );
                }
                Vec::new()
            }
        };
        errors.splice(0..0, top.errors);
        for (i, route) in routes.iter().enumerate() {
            let tls = match route.listener {
                None => server.tls.as_ref(),
                Some(l) => listeners[l].tls.as_ref(),
            };
            let client_ca = tls.is_some_and(|t| t.client_ca_file.is_some());
            if !route.access.client_cert.is_empty() && !client_ca {
                errors.push(ConfigError {
                    key: format!("routes[{i}].access.client_cert"),
                    problem: "needs client certificates, which the listener does not ask for"
                        .into(),
                    fix: "set tls_cert_file, tls_key_file and tls_client_ca_file on the route's listener".into(),
                });
            }
        }
        for (i, route) in routes.iter().enumerate() {
            let off_machine = match route.listener {
                None => Some(server.listen).filter(|a| !a.ip().is_loopback()),
                Some(l) => match &listeners[l].address {
                    ListenAddress::Tcp(a) if !a.ip().is_loopback() => Some(*a),
                    _ => None,
                },
            };
            if let (Some(listen), true) = (off_machine, route.access.is_open()) {
                warnings.push(format!(
                    "routes[{i}] lends its account to every client that reaches {listen}; add [routes.access] rules (networks, a marker header, ...) for a listener off this machine"
                ));
            }
        }
        overrides::attribute(&mut errors, &applied);
        if errors.is_empty() {
            Ok(Config {
                server,
                identity,
                tls,
                accounts,
                routes,
                listeners,
                warnings,
            })
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// A set of the forwarding headers the proxy can set (`server.forwarding_headers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardingHeaders(u8);

impl ForwardingHeaders {
    /// The names, lowercase, in the order of their bits.
    pub const NAMES: [&'static str; 5] = [
        "x-forwarded-for",
        "x-real-ip",
        "forwarded",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    pub const X_FORWARDED_FOR: ForwardingHeaders = ForwardingHeaders(1);
    pub const X_REAL_IP: ForwardingHeaders = ForwardingHeaders(1 << 1);
    pub const FORWARDED: ForwardingHeaders = ForwardingHeaders(1 << 2);
    pub const X_FORWARDED_PROTO: ForwardingHeaders = ForwardingHeaders(1 << 3);
    pub const X_FORWARDED_HOST: ForwardingHeaders = ForwardingHeaders(1 << 4);
    /// All five: the default.
    pub const ALL: ForwardingHeaders = ForwardingHeaders(0b1_1111);
    pub const NONE: ForwardingHeaders = ForwardingHeaders(0);

    /// The header called `name` (any case), if it is one of the five.
    pub fn named(name: &str) -> Option<ForwardingHeaders> {
        let i = Self::NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name.trim()))?;
        Some(ForwardingHeaders(1 << i))
    }

    /// The lowercase name of a set of one header.
    pub const fn name(self) -> Option<&'static str> {
        match self.0.count_ones() {
            1 => Some(Self::NAMES[self.0.trailing_zeros() as usize]),
            _ => None,
        }
    }

    /// This set with `other`'s headers too.
    pub fn with(self, other: ForwardingHeaders) -> ForwardingHeaders {
        ForwardingHeaders(self.0 | other.0)
    }

    /// Whether every header of `other` is in this set.
    pub fn contains(self, other: ForwardingHeaders) -> bool {
        self.0 & other.0 == other.0
    }

    /// How many headers the set holds.
    pub(crate) fn len(self) -> usize {
        self.0.count_ones() as usize
    }
}
