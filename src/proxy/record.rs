//! One request's record while it is answered: counted in flight, then its duration observed
//! and, with `server.access_log`, one log line, when its answer has been sent or given up.

use crate::identity::Account;
use crate::metrics::RouteMetrics;
use http::{HeaderValue, Method, StatusCode};
use std::sync::Arc;
use std::time::Instant;

/// A request being answered; dropped with its answer's body.
#[derive(Debug)]
pub struct Record {
    route: Arc<RouteMetrics>,
    started: Instant,
    /// What the access log line says, when there is one.
    line: Option<Box<AccessLine>>,
}

#[derive(Debug)]
struct AccessLine {
    method: Method,
    path: String,
    status: u16,
    upstream: Option<Arc<str>>,
    /// The token sent and its account, which names it by fingerprint when the line is written.
    token: Option<(HeaderValue, Arc<Account>)>,
}

impl Record {
    /// Begins the record of a request, counted under `route` until it is picked.
    pub fn begin(route: &Arc<RouteMetrics>, started: Instant) -> Record {
        route.begun();
        Record {
            route: route.clone(),
            started,
            line: None,
        }
    }

    /// Moves the request to the series of the route that took it (requests in flight are
    /// one gauge for every route, so it stays counted as it was).
    pub fn set_route(&mut self, route: &Arc<RouteMetrics>) {
        if !Arc::ptr_eq(&self.route, route) {
            self.route = route.clone();
        }
    }

    /// Returns when the request began.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Returns the series the request is counted under.
    pub fn route(&self) -> &RouteMetrics {
        &self.route
    }

    /// Counts the answer's status.
    pub fn answered(&mut self, status: StatusCode) {
        self.route.answered(status);
        if let Some(line) = &mut self.line {
            line.status = status.as_u16();
        }
    }

    /// Starts the access log line (the path without its query, which may carry secrets).
    pub fn log(&mut self, method: &Method, path: &str) {
        self.line = Some(Box::new(AccessLine {
            method: method.clone(),
            path: path.to_owned(),
            status: 0,
            upstream: None,
            token: None,
        }));
    }

    /// Adds where the request went and the token it carried.
    pub fn log_forward(&mut self, upstream: &Arc<str>, sent: &HeaderValue, account: &Arc<Account>) {
        if let Some(line) = &mut self.line {
            line.upstream = Some(upstream.clone());
            line.token = Some((sent.clone(), account.clone()));
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.route.ended(elapsed);
        if let Some(line) = self.line.take() {
            let token = line
                .token
                .as_ref()
                .map(|(sent, account)| account.fingerprint_of(sent));
            tracing::info!(
                target: "access",
                route = self.route.name(),
                http.method = %line.method,
                path = %line.path,
                status = line.status,
                duration_ms = elapsed.as_secs_f64() * 1e3,
                upstream = line.upstream.as_deref().unwrap_or("-"),
                token = token.as_deref().unwrap_or("-"),
                "request"
            );
        }
    }
}
