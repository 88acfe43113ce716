//! Prometheus metrics, served by the admin listener at `/metrics` in the Prometheus text
//! format. The request path touches only pre-resolved handles (relaxed atomic additions);
//! account series are read from the accounts themselves at scrape time.

mod histogram;

pub use histogram::Histogram;

use crate::identity::stats::{ReplayOutcome, TokenOutcome};
use crate::identity::Account;
use arc_swap::ArcSwap;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Every series name starts with this.
pub const PREFIX: &str = "mosaic_auth_proxy";
/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type RouteLabel = [(&'static str, String); 1];
type RouteStatusLabels = [(&'static str, String); 2];

/// Why a forwarded request got no answer from its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamError {
    Connect,
    Timeout,
    /// The connection or the answer broke off.
    Broken,
    /// The TLS handshake failed (certificate, name, protocol).
    Tls,
}

impl UpstreamError {
    const ALL: [UpstreamError; 4] = [
        UpstreamError::Connect,
        UpstreamError::Timeout,
        UpstreamError::Broken,
        UpstreamError::Tls,
    ];

    fn label(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Broken => "broken",
            UpstreamError::Tls => "tls",
        }
    }
}

/// The accounts whose series `/metrics` shows: those of the configuration in use.
pub type LiveAccounts = Arc<ArcSwap<Vec<Arc<Account>>>>;

/// The proxy's metrics and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatusLabels, Counter>,
    request_duration: Family<RouteLabel, Histogram>,
    upstream_duration: Family<RouteLabel, Histogram>,
    upstream_errors: Family<RouteStatusLabels, Counter>,
    upstream_resent: Family<RouteLabel, Counter>,
    in_flight: Gauge,
    client_connections: Gauge,
}

impl Metrics {
    /// Creates the metrics; the account series come from `accounts` at each scrape.
    pub fn new(accounts: LiveAccounts) -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let requests = Family::default();
        let request_duration = Family::default();
        let upstream_duration = Family::default();
        let upstream_errors = Family::default();
        let upstream_resent = Family::default();
        let in_flight = Gauge::default();
        let client_connections = Gauge::default();
        registry.register(
            "requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Whole requests, from the request head to the answer's last byte",
            request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Forwarded requests, from sending to the upstream's answer head",
            upstream_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Forwarded requests the upstream did not answer, by kind (connect, timeout, broken, tls)",
            upstream_errors.clone(),
        );
        registry.register(
            "upstream_resent",
            "Idempotent requests sent once more on a new connection after the upstream closed a reused one under them",
            upstream_resent.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being answered now",
            in_flight.clone(),
        );
        registry.register(
            "client_connections",
            "Client connections open now, every listener together",
            client_connections.clone(),
        );
        registry.register_collector(Box::new(AccountSeries(accounts)));
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            upstream_resent,
            in_flight,
            client_connections,
        }
    }

    /// Resolves the handles of one route (a route of a later configuration with the same
    /// name continues its series).
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let label: RouteLabel = [("route", name.to_owned())];
        let errors = UpstreamError::ALL.map(|kind| {
            let labels = [
                ("route", name.to_owned()),
                ("kind", kind.label().to_owned()),
            ];
            self.upstream_errors.get_or_create(&labels).clone()
        });
        Arc::new(RouteMetrics {
            name: name.to_owned(),
            requests: self.requests.clone(),
            statuses: (100..600).map(|_| OnceLock::new()).collect(),
            duration: self.request_duration.get_or_create(&label).clone(),
            upstream: self.upstream_duration.get_or_create(&label).clone(),
            errors,
            resent: self.upstream_resent.get_or_create(&label).clone(),
            in_flight: self.in_flight.clone(),
        })
    }

    /// Returns the gauge of open client connections.
    pub fn client_connections(&self) -> &Gauge {
        &self.client_connections
    }

    /// Renders every series in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// The handles one route's requests update.
#[derive(Debug)]
pub struct RouteMetrics {
    name: String,
    requests: Family<RouteStatusLabels, Counter>,
    /// One counter per status 100..=599, resolved on its first use.
    statuses: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    upstream: Histogram,
    errors: [Counter; 4],
    resent: Counter,
    in_flight: Gauge,
}

impl RouteMetrics {
    /// Counts a request that has begun.
    pub fn begun(&self) {
        self.in_flight.inc();
    }

    /// Counts a request that has ended (its answer sent or given up) after `elapsed`.
    pub fn ended(&self, elapsed: Duration) {
        self.in_flight.dec();
        self.duration.observe(elapsed);
    }

    /// Counts an answer by its status.
    pub fn answered(&self, status: http::StatusCode) {
        let index = usize::from(status.as_u16()).saturating_sub(100);
        let Some(slot) = self.statuses.get(index) else {
            return;
        };
        slot.get_or_init(|| {
            let labels = [
                ("route", self.name.clone()),
                ("status", status.as_u16().to_string()),
            ];
            self.requests.get_or_create(&labels).clone()
        })
        .inc();
    }

    /// Records how long the upstream took to send its answer head.
    pub fn upstream_answered(&self, elapsed: Duration) {
        self.upstream.observe(elapsed);
    }

    /// Counts an upstream failure.
    pub fn upstream_failed(&self, kind: UpstreamError) {
        self.errors[kind as usize].inc();
    }

    /// Counts a request sent once more after the upstream closed a reused connection under it.
    pub fn upstream_resent(&self) {
        self.resent.inc();
    }

    /// Returns the route's name, its label.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The account series, read at scrape time from the accounts in use.
#[derive(Debug)]
struct AccountSeries(LiveAccounts);

/// One sample of an account series: its labels and value.
type Sample = (Vec<(&'static str, String)>, f64);

impl prometheus_client::collector::Collector for AccountSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let accounts = self.0.load();
        let statuses: Vec<_> = accounts.iter().map(|a| (a, a.status())).collect();
        let labels = |a: &Account, more: Option<(&'static str, &str)>| {
            let mut labels = vec![("account", a.name().to_owned())];
            labels.extend(more.map(|(k, v)| (k, v.to_owned())));
            labels
        };
        let mut token_requests = Vec::new();
        let mut expiry = Vec::new();
        let mut last_refresh = Vec::new();
        let mut rejections = Vec::new();
        let mut replays = Vec::new();
        let mut breaker = Vec::new();
        for (account, status) in &statuses {
            let stats = account.stats();
            for outcome in TokenOutcome::ALL {
                let n = stats.token_requests(outcome) as f64;
                token_requests.push((labels(account, Some(("outcome", outcome.label()))), n));
            }
            if let Some(left) = status.expires_in_s {
                expiry.push((labels(account, None), left));
            }
            if let Some(ms) = stats.last_refresh_ms() {
                last_refresh.push((labels(account, None), ms as f64 / 1e3));
            }
            for (code, n) in stats.rejections() {
                rejections.push((labels(account, Some(("code", &code))), n as f64));
            }
            for outcome in ReplayOutcome::ALL {
                let n = stats.replays(outcome) as f64;
                replays.push((labels(account, Some(("outcome", outcome.label()))), n));
            }
            breaker.push((
                labels(account, None),
                f64::from(u8::from(status.breaker_open)),
            ));
        }
        let families = [
            (
                "token_requests",
                "Token requests to the identity service, by outcome",
                MetricType::Counter,
                token_requests,
            ),
            (
                "token_expiry_seconds",
                "Seconds until the cached token expires (negative once it has)",
                MetricType::Gauge,
                expiry,
            ),
            (
                "token_last_refresh_timestamp_seconds",
                "When the last token was obtained, in seconds since the Unix epoch",
                MetricType::Gauge,
                last_refresh,
            ),
            (
                "token_rejections",
                "Tokens an upstream refused, by the upstream's code",
                MetricType::Counter,
                rejections,
            ),
            (
                "replays",
                "Requests whose token was refused, by what became of them",
                MetricType::Counter,
                replays,
            ),
            (
                "breaker_open",
                "1 while upstreams' refusals of fresh tokens are passed through without a refresh",
                MetricType::Gauge,
                breaker,
            ),
        ];
        for (name, help, kind, samples) in families {
            encode_family(&mut encoder, name, help, kind, &samples)?;
        }
        Ok(())
    }
}

fn encode_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[Sample],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = family.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*value as u64).encode(sample)?,
            _ => ConstGauge::new(*value).encode(sample)?,
        }
    }
    Ok(())
}
