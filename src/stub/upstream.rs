//! A stand-in for a Mosaic service: checks the token exactly as Mosaic does (header form,
//! RS256 against the JWKS fetched by `kid`, issuer, zero clock tolerance) and reports
//! failures as HTTP 200 with a GraphQL error. It echoes what it saw, and streams bodies.

use super::body::PatternBody;
use super::keys::VerifyingKey;
use super::{json, BoxError, StubBody};
use crate::jwt;
use crate::mosaic::{self, ErrorCode};
use crate::shutdown::Shutdown;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// How many of the last requests are kept for tests to look at.
const RECENT: usize = 8;

/// How long a fetched signing key is trusted before the JWKS is fetched again, as in Mosaic.
const KEY_CACHE_TTL: Duration = Duration::from_secs(600);

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The verified claims, or the Mosaic code the request was refused with.
    pub verdict: Result<Value, ErrorCode>,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    expired: AtomicU64,
    refused: AtomicU64,
}

struct State {
    identity_origin: String,
    /// `Authorization` values refused as expired, whatever their `exp` says.
    revoked: Mutex<HashSet<HeaderValue>>,
    /// A code every request is refused with, valid token or not.
    refuse_all: Mutex<Option<ErrorCode>>,
    http: reqwest::Client,
    keys: Mutex<HashMap<String, (VerifyingKey, Instant)>>,
    counters: Counters,
    connections: Arc<super::Connections>,
    /// The last requests seen, oldest first.
    recent: Mutex<VecDeque<Seen>>,
    /// Requests received; watched by answers held until enough have arrived.
    requests: tokio::sync::watch::Sender<u64>,
    /// Answers wait until this many requests have arrived.
    hold_until: AtomicU64,
}

/// Watches a running Mosaic stand-in.
#[derive(Clone)]
pub struct UpstreamHandle(Arc<State>);

impl UpstreamHandle {
    /// Counts requests received.
    pub fn requests(&self) -> u64 {
        *self.0.requests.borrow()
    }

    /// Counts requests whose token was accepted.
    pub fn accepted(&self) -> u64 {
        self.0.counters.accepted.load(Ordering::SeqCst)
    }

    /// Counts requests refused with `ACCESS_TOKEN_EXPIRED`.
    pub fn expired(&self) -> u64 {
        self.0.counters.expired.load(Ordering::SeqCst)
    }

    /// Counts requests refused for any other token problem.
    pub fn refused(&self) -> u64 {
        self.0.counters.refused.load(Ordering::SeqCst)
    }

    /// Counts the connections accepted so far, and open now.
    pub fn connections(&self) -> &super::Connections {
        &self.0.connections
    }

    /// Returns the last request seen.
    pub fn last(&self) -> Option<Seen> {
        self.0.recent.lock().expect("recent lock").back().cloned()
    }

    /// Returns the last requests seen (up to 8), oldest first.
    pub fn recent(&self) -> Vec<Seen> {
        self.0
            .recent
            .lock()
            .expect("recent lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Refuses the token of this `Authorization` value from now on, as expired.
    pub fn revoke(&self, authorization: HeaderValue) {
        self.0
            .revoked
            .lock()
            .expect("revoked lock")
            .insert(authorization);
    }

    /// Holds every answer until `n` more requests have arrived (at most ten seconds), then
    /// answers them all: requests sent together are all in flight at once, however slow the
    /// machine.
    pub fn hold_until(&self, n: u64) {
        self.0
            .hold_until
            .store(self.requests() + n, Ordering::SeqCst);
    }

    /// Refuses every request with `code` (a rejection no fresh token cures), or stops.
    pub fn refuse_all(&self, code: Option<ErrorCode>) {
        *self.0.refuse_all.lock().expect("refuse lock") = code;
    }
}

/// A bound Mosaic stand-in, not yet serving.
pub struct MosaicUpstream {
    listener: TcpListener,
    state: Arc<State>,
    keep_alive: Duration,
}

impl MosaicUpstream {
    /// Binds `addr`; tokens are checked against the JWKS of the identity service at `identity_origin`.
    pub async fn bind(addr: SocketAddr, identity_origin: &str) -> std::io::Result<MosaicUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let tls = crate::tls::client_config(false, None).map_err(std::io::Error::other)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(MosaicUpstream {
            listener,
            state: Arc::new(State {
                identity_origin: identity_origin.trim_end_matches('/').to_owned(),
                revoked: Mutex::default(),
                refuse_all: Mutex::default(),
                http,
                keys: Mutex::default(),
                counters: Counters::default(),
                connections: Arc::default(),
                recent: Mutex::default(),
                requests: tokio::sync::watch::Sender::new(0),
                hold_until: AtomicU64::new(0),
            }),
            keep_alive: super::NODE_KEEP_ALIVE,
        })
    }

    /// Keeps idle connections for `seconds` (at least one, and says so) instead of Node's five.
    pub fn keep_alive(mut self, seconds: u64) -> MosaicUpstream {
        self.keep_alive = Duration::from_secs(seconds.max(1));
        self
    }

    /// Returns the bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Returns the handle that watches this stand-in.
    pub fn handle(&self) -> UpstreamHandle {
        UpstreamHandle(self.state.clone())
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let connections = self.state.connections.clone();
        super::serve_stand_in(
            self.listener,
            self.state,
            answer,
            connections,
            self.keep_alive,
            shutdown,
        )
        .await;
    }
}

async fn answer(
    state: Arc<State>,
    mut request: Request<Incoming>,
) -> Result<Response<StubBody>, BoxError> {
    let state = &*state;
    if request.uri().path() == "/health" && request.method() == http::Method::GET {
        // For a rig's health checks; not counted as a request.
        return Ok(super::json(StatusCode::OK, r#"{"status":"ok"}"#));
    }
    let c = &state.counters;
    let mut arrived = 0;
    state.requests.send_modify(|n| {
        *n += 1;
        arrived = *n;
    });
    let hold_until = state.hold_until.load(Ordering::SeqCst);
    if arrived < hold_until {
        let mut requests = state.requests.subscribe();
        let held = requests.wait_for(|n| *n >= hold_until);
        let _ = tokio::time::timeout(Duration::from_secs(10), held).await;
    }
    let query = request.uri().query().map(str::to_owned);
    let has_query_token = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("access_token=")));
    let header_value = request.headers().get(header::AUTHORIZATION).cloned();
    if has_query_token && header_value.is_some() {
        // Mosaic answers a token given twice with 400 and an empty body.
        let mut r = Response::new(super::full(""));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(r);
    }
    let token = header_value
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty() && !t.contains(' '));
    if request.uri().path().ends_with("/slow") {
        // A slow operation: the token is checked when it ends, as a late check would.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let refuse_all = state.refuse_all.lock().expect("refuse lock").clone();
    let revoked = header_value
        .as_ref()
        .is_some_and(|v| state.revoked.lock().expect("revoked lock").contains(v));
    let verdict = match (token, refuse_all) {
        (_, Some(code)) => Err(code),
        (None, None) => Err(ErrorCode::AccessTokenRequired),
        (Some(_), None) if revoked => Err(ErrorCode::AccessTokenExpired),
        (Some(token), None) => verify(state, token).await,
    };
    let seen = Seen {
        method: request.method().clone(),
        path: request.uri().path().to_owned(),
        query,
        headers: request.headers().clone(),
        verdict: verdict.clone(),
    };
    {
        let mut recent = state.recent.lock().expect("recent lock");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(seen.clone());
    }
    if seen.path.ends_with("/ws") {
        return Ok(websocket(&mut request, verdict));
    }
    let claims = match verdict {
        Ok(claims) => {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            claims
        }
        Err(code) => {
            // Like a Node service, read the whole body before answering.
            drain(request.into_body()).await;
            let counter = if code == ErrorCode::AccessTokenExpired {
                &c.expired
            } else {
                &c.refused
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let message = match code {
                ErrorCode::AccessTokenExpired => "Access Token has expired.",
                ErrorCode::AccessTokenRequired => "Access Token is required.",
                _ => "Access Token verification failed.",
            };
            return Ok(json(
                StatusCode::OK,
                super::error_body(&code, message, None, "whoami"),
            ));
        }
    };
    if seen.path.ends_with("/echo") {
        // Stream the request body straight back.
        let body = request.into_body().map_err(BoxError::from).boxed();
        return Ok(Response::new(body));
    }
    drain(request.into_body()).await;
    if seen.path.ends_with("/forbidden") {
        // A valid token without the permission: Mosaic's USER_NOT_AUTHORIZED.
        return Ok(json(
            StatusCode::OK,
            super::error_body(
                &ErrorCode::UserNotAuthorized,
                "User is not authorized to access the operation.",
                None,
                "forbidden",
            ),
        ));
    }
    if seen.path.ends_with("/bytes") {
        let n = seen
            .query
            .as_deref()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("n=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return Ok(Response::new(
            PatternBody::new(n).map_err(|never| match never {}).boxed(),
        ));
    }
    let headers: serde_json::Map<String, Value> = seen
        .headers
        .iter()
        .filter(|(name, _)| *name != header::AUTHORIZATION)
        .map(|(name, value)| {
            (
                name.to_string(),
                Value::from(value.to_str().unwrap_or("<binary>")),
            )
        })
        .collect();
    let body = json!({
        "data": {"whoami": {
            "sub": claims["sub"], "name": claims["name"], "tenantId": claims["tenantId"],
            "environmentId": claims["environmentId"], "permissions": claims["permissions"],
            "iat": claims["iat"], "exp": claims["exp"],
        }},
        "request": {"method": seen.method.as_str(), "path": seen.path, "query": seen.query, "headers": headers},
    });
    Ok(json(StatusCode::OK, body.to_string()))
}

/// Reads a body to its end, keeping nothing.
async fn drain(mut body: Incoming) {
    while let Some(Ok(_)) = body.frame().await {}
}

/// Accepts a WebSocket upgrade like a Mosaic subscription endpoint: with a valid token it
/// sends one text frame with the account's name and closes normally; with an expired one it
/// closes with 4403, and with any other token problem with 4401.
fn websocket(
    request: &mut Request<Incoming>,
    verdict: Result<Value, ErrorCode>,
) -> Response<StubBody> {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"not a WebSocket handshake"}"#,
        );
    };
    let mut accept_input = key.as_bytes().to_vec();
    accept_input.extend_from_slice(GUID.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &accept_input);
    let accept = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    };
    let frames: Vec<u8> = match verdict {
        Ok(claims) => {
            let text = format!("hello {}", claims["name"].as_str().unwrap_or_default());
            let mut f = vec![0x81, text.len() as u8];
            f.extend_from_slice(text.as_bytes());
            f.extend_from_slice(&[0x88, 0x02, 0x03, 0xe8]);
            f
        }
        Err(ErrorCode::AccessTokenExpired) => vec![0x88, 0x02, 0x11, 0x33],
        Err(_) => vec![0x88, 0x02, 0x11, 0x31],
    };
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            use tokio::io::AsyncWriteExt;
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let _ = io.write_all(&frames).await;
            let _ = io.shutdown().await;
        }
    });
    let mut response = Response::new(super::full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("base64 is a header value"),
    );
    response
}

async fn verify(state: &State, token: &str) -> Result<Value, ErrorCode> {
    let parts = jwt::decode(token).ok_or(ErrorCode::AccessTokenVerificationFailed)?;
    if parts.header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(ErrorCode::AccessTokenVerificationFailed);
    }
    let kid = parts
        .header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(ErrorCode::SigningKeyNotFound)?;
    let key = key_for(state, kid, &parts.claims).await?;
    if !key.verifies(token) {
        return Err(ErrorCode::AccessTokenVerificationFailed);
    }
    if parts.claims.get("iss").and_then(Value::as_str) != Some(mosaic::ISSUER) {
        return Err(ErrorCode::AccessTokenVerificationFailed);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let exp = jwt::seconds(&parts.claims, "exp").ok_or(ErrorCode::AccessTokenVerificationFailed)?;
    // Zero tolerance: expired at the very second of `exp`.
    if now >= exp {
        return Err(ErrorCode::AccessTokenExpired);
    }
    if jwt::seconds(&parts.claims, "nbf").is_some_and(|nbf| now < nbf) {
        return Err(ErrorCode::AccessTokenVerificationFailed);
    }
    Ok(parts.claims)
}

async fn key_for(state: &State, kid: &str, claims: &Value) -> Result<VerifyingKey, ErrorCode> {
    if let Some((key, at)) = state.keys.lock().expect("keys lock").get(kid) {
        if at.elapsed() < KEY_CACHE_TTL {
            return Ok(key.clone());
        }
    }
    let id = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or("");
    let url = format!(
        "{}/{}/{}/.well-known/jwks.json",
        state.identity_origin,
        id("tenantId"),
        id("environmentId")
    );
    let jwks: Value = async {
        state
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }
    .await
    .map_err(|_: reqwest::Error| ErrorCode::JwksError)?;
    let mut keys = state.keys.lock().expect("keys lock");
    for jwk in jwks
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(id), Some(key)) = (
            jwk.get("kid").and_then(Value::as_str),
            VerifyingKey::from_jwk(jwk),
        ) {
            keys.insert(id.to_owned(), (key, Instant::now()));
        }
    }
    keys.get(kid)
        .map(|(key, _)| key.clone())
        .ok_or(ErrorCode::SigningKeyNotFound)
}
