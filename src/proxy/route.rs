//! Picking the route of a request: host first, then the longest path prefix.

use super::access::Access;
use super::pool::Pool;
use super::upstream::Budget;
use crate::config::{RouteConfig, Upstream};
use crate::identity::Account;
use crate::metrics::{Metrics, RouteMetrics};
use http::uri::{InvalidUri, PathAndQuery};
use std::sync::Arc;

/// One route: which requests it takes, where they go and whose token they carry.
#[derive(Debug)]
pub struct Route {
    host: Option<String>,
    prefix: String,
    pub upstream: Upstream,
    /// The upstream as the access log names it, made once.
    pub upstream_text: Arc<str>,
    strip_prefix: bool,
    /// Whether a refused request may be replayed once with a fresh token.
    pub replay: bool,
    /// Whether `%2F` and `%5C` may stand in paths (forwarded as they are).
    pub allow_encoded_slashes: bool,
    /// The `Upgrade` protocols tunnelled, lower case.
    pub upgrades: Vec<String>,
    /// The upstream's budget of requests and connections, shared by its routes.
    pub budget: Arc<Budget>,
    /// Who may borrow the account.
    pub access: Access,
    /// The upstream is spoken to in HTTP/2 with prior knowledge.
    pub h2c: bool,
    /// The connections to the upstream (its own where the route sets `tls`).
    pub pool: Arc<Pool>,
    pub account: Arc<Account>,
    /// `host/prefix`, for logs and the metrics' `route` label.
    pub name: String,
    /// The route's series.
    pub metrics: Arc<RouteMetrics>,
    /// The `Host` of requests over HTTP/1.1, made once; `None` for h2c (an HTTP/2
    /// connection sends `:authority` instead).
    pub host_header: Option<http::HeaderValue>,
}

impl Route {
    /// Creates a route from its configuration, the account it names, its upstream's budget
    /// and the pool of its connections.
    pub fn new(
        config: &RouteConfig,
        account: Arc<Account>,
        budget: Arc<Budget>,
        pool: Arc<Pool>,
        metrics: &Metrics,
    ) -> Route {
        let name = route_name(config);
        Route {
            host: config.host.clone(),
            prefix: config.path_prefix.clone(),
            upstream: config.upstream.clone(),
            upstream_text: config.upstream.to_string().into(),
            strip_prefix: config.strip_prefix,
            replay: config.replay,
            allow_encoded_slashes: config.allow_encoded_slashes,
            upgrades: config.upgrades.clone(),
            budget,
            access: Access::new(&config.access),
            h2c: config.h2c,
            pool,
            account,
            metrics: metrics.route(&name),
            host_header: host_header(&config.upstream, config.h2c),
            name,
        }
    }

    /// Returns what `path` (which this route matched) has below the prefix.
    pub fn rest_of<'a>(&self, path: &'a str) -> &'a str {
        if self.prefix == "/" {
            path
        } else {
            &path[self.prefix.len().min(path.len())..]
        }
    }

    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        host_ok && prefix_matches(&self.prefix, path)
    }

    /// Returns the upstream's path and query for a request's: the request's own (a cheap
    /// clone) when nothing changes, otherwise rebuilt by [`Route::upstream_path_and_query`].
    /// `judged` is the request's path if judging it changed it.
    pub fn upstream_target(
        &self,
        original: Option<&PathAndQuery>,
        judged: Option<&str>,
    ) -> Result<PathAndQuery, InvalidUri> {
        let unchanged = |pq: &&PathAndQuery| {
            judged.is_none()
                && self.upstream.base_path.is_empty()
                && (!self.strip_prefix || self.prefix == "/")
                && !pq.query().is_some_and(|q| q.contains("access_token"))
        };
        match original.filter(unchanged) {
            Some(pq) => Ok(pq.clone()),
            None => {
                let (path, query) = original.map_or(("/", None), |pq| (pq.path(), pq.query()));
                let path = judged.unwrap_or(path);
                PathAndQuery::try_from(self.upstream_path_and_query(path, query))
            }
        }
    }

    /// Returns the upstream's path and query for a request's `path` and `query`: the prefix
    /// stripped if the route says so, the upstream's base path put in front, and any
    /// `access_token` query parameter dropped.
    pub fn upstream_path_and_query(&self, path: &str, query: Option<&str>) -> String {
        let rest = if self.strip_prefix && self.prefix != "/" {
            &path[self.prefix.len()..]
        } else {
            path
        };
        let mut out = String::with_capacity(
            self.upstream.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1),
        );
        out.push_str(&self.upstream.base_path);
        if rest.is_empty() || !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        if let Some(query) = query {
            super::headers::push_query_without_access_token(&mut out, query);
        }
        out
    }
}

/// `/media` matches `/media`, `/media/x` and not `/mediax`; `/` matches everything.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// The `Host` an HTTP/1.1 client sends to `upstream`: its host, and its port unless it is
/// the scheme's default; `None` for h2c.
fn host_header(upstream: &Upstream, h2c: bool) -> Option<http::HeaderValue> {
    if h2c {
        return None;
    }
    let default_port = if upstream.scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    let host = upstream.authority.host();
    let value = match upstream.authority.port_u16().filter(|p| *p != default_port) {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    http::HeaderValue::from_str(&value).ok()
}

/// Names a route `host/prefix` (`*` for any host), with its listener's name in front when it
/// is served on a further listener: `partner:*/media`.
pub fn route_name(config: &RouteConfig) -> String {
    let host = config.host.as_deref().unwrap_or("*");
    match &config.listener_name {
        Some(listener) => format!("{listener}:{host}{}", config.path_prefix),
        None => format!("{host}{}", config.path_prefix),
    }
}

/// Returns `host` without a trailing `:port` (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.split_once(':').map_or(host, |(h, _)| h)
}

/// All routes, in the order they are tried.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Some route names a host (otherwise the request's host need not be looked at).
    by_host: bool,
}

impl RouteTable {
    /// Orders routes so the first match is the best: a route naming the host beats one that
    /// does not; among those, the longest prefix wins.
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.prefix.len())));
        let by_host = routes.iter().any(|r| r.host.is_some());
        RouteTable { routes, by_host }
    }

    /// Finds the route of a request to `host` (port and case ignored) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.filter(|_| self.by_host).map(strip_port);
        self.routes.iter().find(|r| r.matches(host, path))
    }

    /// Tells whether some route names a host, so that finding a route reads the request's.
    pub fn by_host(&self) -> bool {
        self.by_host
    }

    /// Tells whether some route names `host` explicitly (port and case ignored).
    pub fn names_host(&self, host: &str) -> bool {
        let host = strip_port(host);
        self.routes.iter().any(|r| {
            r.host
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(host))
        })
    }

    /// Returns the routes in match order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(routes: &str) -> RouteTable {
        let text = format!("[accounts.a]\nclient_id = \"a\"\nclient_secret_env = \"S\"\n{routes}");
        let config = Config::parse(&text, &|_| Some("s".into())).unwrap();
        let budgets = crate::proxy::upstream::Budgets::new([(String::new(), 8)])
            .get("")
            .unwrap();
        let pool = Arc::new(crate::proxy::pool::Pool::new(
            http::uri::Scheme::HTTP,
            http::uri::Authority::from_static("localhost"),
            false,
            crate::proxy::pool::connector(
                crate::tls::client_config(false, None).unwrap(),
                None,
                std::time::Duration::from_secs(1),
            ),
            0,
            crate::config::DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            budgets.clone(),
            1,
        ));
        let account = Arc::new(Account::new(
            "a",
            "a",
            crate::secret::Secret::new("s"),
            crate::config::SecretSource::Inline,
            Default::default(),
            Default::default(),
        ));
        let metrics = crate::metrics::Metrics::new(Arc::default());
        RouteTable::new(
            config
                .routes
                .iter()
                .map(|r| Route::new(r, account.clone(), budgets.clone(), pool.clone(), &metrics))
                .collect(),
        )
    }

    fn pick<'a>(t: &'a RouteTable, host: Option<&str>, path: &str) -> Option<&'a str> {
        t.find(host, path).map(|r| r.name.as_str())
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.example:8080"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn the_longest_prefix_wins_on_segment_boundaries() {
        let t = table(
            r#"
            [[routes]]
            upstream = "http://one"
            account = "a"
            [[routes]]
            path_prefix = "/media"
            upstream = "http://two"
            account = "a"
            [[routes]]
            path_prefix = "/media/v2"
            upstream = "http://three"
            account = "a"
        "#,
        );
        assert_eq!(pick(&t, None, "/media/v2/graphql"), Some("*/media/v2"));
        assert_eq!(pick(&t, None, "/media"), Some("*/media"));
        assert_eq!(pick(&t, None, "/media/x"), Some("*/media"));
        assert_eq!(pick(&t, None, "/mediax"), Some("*/"));
    }

    #[test]
    fn a_route_naming_the_host_beats_one_that_does_not() {
        let t = table(
            r#"
            [[routes]]
            path_prefix = "/media"
            upstream = "http://one"
            account = "a"
            [[routes]]
            host = "Video.Example"
            upstream = "http://two"
            account = "a"
        "#,
        );
        assert_eq!(
            pick(&t, Some("video.example:8080"), "/media"),
            Some("video.example/")
        );
        assert_eq!(pick(&t, Some("other.example"), "/media"), Some("*/media"));
        assert_eq!(pick(&t, Some("other.example"), "/"), None);
        assert!(t.names_host("VIDEO.example:1"));
        assert!(!t.names_host("other.example"));
    }

    #[test]
    fn upstream_paths_strip_the_prefix_join_the_base_and_drop_access_token() {
        let t = table(
            r#"
            [[routes]]
            path_prefix = "/media"
            strip_prefix = true
            upstream = "http://up/v1"
            account = "a"
        "#,
        );
        let r = t.find(None, "/media/graphql").unwrap();
        assert_eq!(
            r.upstream_path_and_query("/media/graphql", None),
            "/v1/graphql"
        );
        assert_eq!(r.upstream_path_and_query("/media", None), "/v1/");
        assert_eq!(
            r.upstream_path_and_query("/media/q", Some("a=1&access_token=x&b=2")),
            "/v1/q?a=1&b=2"
        );
        assert_eq!(
            r.upstream_path_and_query("/media/q", Some("access_token=x")),
            "/v1/q"
        );
    }

    #[test]
    fn an_unchanged_target_is_reused_and_a_changed_one_rebuilt() {
        let t = table(
            r#"
            [[routes]]
            upstream = "http://up"
            account = "a"
        "#,
        );
        let r = t.find(None, "/x").unwrap();
        let pq = PathAndQuery::from_static("/x?a=1");
        assert_eq!(r.upstream_target(Some(&pq), None).unwrap(), "/x?a=1");
        assert_eq!(r.upstream_target(Some(&pq), Some("/y")).unwrap(), "/y?a=1");
        let pq = PathAndQuery::from_static("/x?access_token=t&a=1");
        assert_eq!(r.upstream_target(Some(&pq), None).unwrap(), "/x?a=1");
        assert_eq!(r.upstream_target(None, None).unwrap(), "/");
    }
}
