//! One request's record while it is answered: counted in flight, then its duration observed
//! and, with `server.access_log`, one log line, when its answer has been sent or given up.

use crate::config::Upstream;
use crate::metrics::RouteMetrics;
use crate::secret::fingerprint;
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
    upstream: Option<String>,
    token: Option<String>,
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

    /// Moves the request to the series of the route that took it.
    pub fn set_route(&mut self, route: &Arc<RouteMetrics>) {
        if !Arc::ptr_eq(&self.route, route) {
            self.route.ended_elsewhere();
            route.begun();
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

    /// Adds where the request went and the fingerprint of the token it carried.
    pub fn log_forward(&mut self, upstream: &Upstream, sent: &HeaderValue) {
        if let Some(line) = &mut self.line {
            line.upstream = Some(upstream.to_string());
            let jwt = sent.to_str().unwrap_or("").trim_start_matches("Bearer ");
            line.token = Some(fingerprint(jwt));
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.route.ended(elapsed);
        if let Some(line) = self.line.take() {
            tracing::info!(
                target: "access",
                route = self.route.name(),
                http.method = %line.method,
                path = %line.path,
                status = line.status,
                duration_ms = elapsed.as_secs_f64() * 1e3,
                upstream = line.upstream.as_deref().unwrap_or("-"),
                token = line.token.as_deref().unwrap_or("-"),
                "request"
            );
        }
    }
}
