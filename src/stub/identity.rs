//! A stand-in for the Mosaic identity service: `authenticateServiceAccount` over GraphQL,
//! RS256 tokens with `kid` and the Mosaic claims, the JWKS, `/health`, and fault modes.

use super::keys::SigningKey;
use super::{full, json, StubBody};
use crate::mosaic::{self, ErrorCode};
use crate::shutdown::Shutdown;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// The stand-in's account unless told otherwise.
pub const DEFAULT_CLIENT_ID: &str = "demo-client";
/// Its secret.
pub const DEFAULT_SECRET: &str = "demo-secret";

/// The largest token request the stand-in reads.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// One service account the stand-in knows. Like the real service it keeps only a hash of
/// the secret.
#[derive(Clone, Debug)]
pub struct StubAccount {
    pub client_id: String,
    /// SHA-256 of the client secret.
    pub secret_sha256: [u8; 32],
    /// The account's display name, the `name` claim.
    pub name: String,
    /// The `permissions` claim: service id → permission keys.
    pub permissions: BTreeMap<String, Vec<String>>,
}

impl StubAccount {
    /// Creates an account with `ADMIN` on the media service.
    pub fn new(client_id: &str, client_secret: &str) -> StubAccount {
        StubAccount {
            client_id: client_id.into(),
            secret_sha256: hash(client_secret),
            name: format!("{client_id} (stand-in)"),
            permissions: BTreeMap::from([("media-service".into(), vec!["ADMIN".into()])]),
        }
    }

    /// Tells whether `secret` is this account's, in constant time.
    fn has_secret(&self, secret: &str) -> bool {
        crate::secret::constant_time_eq(&hash(secret), &self.secret_sha256)
    }

    fn subject(&self) -> String {
        // A stable UUID-shaped id derived from the client id, like Mosaic's account ids.
        let h = crate::secret::sha256_hex(self.client_id.as_bytes(), 16);
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

fn hash(secret: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// What the stand-in's tenant looks like.
#[derive(Clone, Debug)]
pub struct StubSettings {
    pub tenant_id: String,
    pub environment_id: String,
    /// `expiresInSeconds` of every token; at least one second.
    pub lifetime: Duration,
    pub accounts: Vec<StubAccount>,
}

impl Default for StubSettings {
    fn default() -> Self {
        StubSettings {
            tenant_id: "7f3c1a52-93b4-4d0e-8f7a-2b6c5d4e3f21".into(),
            environment_id: "c2a4e6f8-1b3d-4c5e-9f70-a1b2c3d4e5f6".into(),
            lifetime: Duration::from_secs(3600),
            accounts: vec![StubAccount::new(DEFAULT_CLIENT_ID, DEFAULT_SECRET)],
        }
    }
}

/// A misbehaviour of the token endpoint, for fault tests.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer HTTP 500 with a small HTML body.
    Http500,
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Close the connection without answering.
    Reset,
    /// Answer nothing for a minute.
    Hang,
    /// Answer after a delay, correctly.
    Slow(Duration),
    /// Answer 200 with a Mosaic error of this code.
    Error(ErrorCode),
    /// Answer 200 with `data: null` and no errors.
    NullData,
    /// Answer 200 with a null payload.
    NullPayload,
    /// Answer 200 with a body of a mebibyte.
    Huge,
    /// Answer with the token issued last, again.
    SameToken,
}

#[derive(Debug, Default)]
struct Faults {
    fault: Option<Fault>,
    /// Apply the fault to every n-th token request only (0 and 1: to every one).
    every: u64,
}

struct State {
    settings: Mutex<StubSettings>,
    keys: Mutex<Keys>,
    faults: Mutex<Faults>,
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    last_reply: Mutex<Option<String>>,
    origin: String,
}

/// The key that signs, and the one before it, still published until retired so that tokens
/// it signed verify until they expire (a rotation drill).
struct Keys {
    current: Arc<SigningKey>,
    previous: Option<Arc<SigningKey>>,
}

impl State {
    fn reset_secret(&self, client_id: &str, secret: &str) -> bool {
        let mut settings = self.settings.lock().expect("settings lock");
        match settings
            .accounts
            .iter_mut()
            .find(|a| a.client_id == client_id)
        {
            Some(account) => {
                account.secret_sha256 = hash(secret);
                true
            }
            None => false,
        }
    }

    /// Signs with `key` from now on; returns its id and the id of the key it replaces.
    fn rotate(&self, key: SigningKey, retire: bool) -> (String, String) {
        let mut keys = self.keys.lock().expect("keys lock");
        let kid = key.kid().to_owned();
        let old = std::mem::replace(&mut keys.current, Arc::new(key));
        let previous = old.kid().to_owned();
        keys.previous = (!retire).then_some(old);
        (kid, previous)
    }
}

/// Watches and steers a running stand-in.
#[derive(Clone)]
pub struct StubHandle(Arc<State>);

impl StubHandle {
    /// Returns `http://addr`, the origin to configure as `identity.origin`.
    pub fn origin(&self) -> &str {
        &self.0.origin
    }

    /// Counts token requests received, answered or not.
    pub fn token_requests(&self) -> u64 {
        self.0.token_requests.load(Ordering::SeqCst)
    }

    /// Counts tokens issued.
    pub fn tokens_issued(&self) -> u64 {
        self.0.tokens_issued.load(Ordering::SeqCst)
    }

    /// Makes every token request misbehave, or (with `None`) none.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.set_fault_every(1, fault);
    }

    /// Makes every `n`-th token request misbehave.
    pub fn set_fault_every(&self, n: u64, fault: Option<Fault>) {
        *self.0.faults.lock().expect("faults lock") = Faults { fault, every: n };
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.0.settings.lock().expect("settings lock").lifetime = lifetime;
    }

    /// Replaces the known accounts.
    pub fn set_accounts(&self, accounts: Vec<StubAccount>) {
        self.0.settings.lock().expect("settings lock").accounts = accounts;
    }

    /// Returns the id of the key that signs now.
    pub fn kid(&self) -> String {
        self.0
            .keys
            .lock()
            .expect("keys lock")
            .current
            .kid()
            .to_owned()
    }

    /// Returns the tenant and environment ids.
    pub fn tenant(&self) -> (String, String) {
        let s = self.0.settings.lock().expect("settings lock");
        (s.tenant_id.clone(), s.environment_id.clone())
    }

    /// Returns the JWKS URL of the tenant's environment.
    pub fn jwks_url(&self) -> String {
        let (tenant, environment) = self.tenant();
        format!(
            "{}/{tenant}/{environment}/.well-known/jwks.json",
            self.origin()
        )
    }
}

/// A bound stand-in, not yet serving.
pub struct IdentityStub {
    listener: TcpListener,
    state: Arc<State>,
}

impl IdentityStub {
    /// Binds `addr` (port 0 picks one) with `settings`, signing with `key`.
    pub async fn bind(
        addr: SocketAddr,
        settings: StubSettings,
        key: SigningKey,
    ) -> std::io::Result<IdentityStub> {
        let listener = TcpListener::bind(addr).await?;
        let origin = format!("http://{}", listener.local_addr()?);
        Ok(IdentityStub {
            listener,
            state: Arc::new(State {
                settings: Mutex::new(settings),
                keys: Mutex::new(Keys {
                    current: Arc::new(key),
                    previous: None,
                }),
                faults: Mutex::default(),
                token_requests: AtomicU64::new(0),
                tokens_issued: AtomicU64::new(0),
                last_reply: Mutex::default(),
                origin,
            }),
        })
    }

    /// Returns the handle that watches and steers this stand-in.
    pub fn handle(&self) -> StubHandle {
        StubHandle(self.state.clone())
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let connections = Default::default();
        super::serve_stand_in(
            self.listener,
            self.state,
            answer,
            connections,
            super::NODE_KEEP_ALIVE,
            shutdown,
        )
        .await;
    }
}

async fn answer(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<StubBody>, super::BoxError> {
    let state = &*state;
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/health") => Ok(json(StatusCode::OK, r#"{"status":"ok"}"#)),
        (&Method::POST, "/admin/rotate-key") => rotate_key(state, request).await,
        (&Method::POST, p) if p.starts_with("/admin/accounts/") && p.ends_with("/secret") => {
            let client_id = &p["/admin/accounts/".len()..p.len() - "/secret".len()];
            reset_secret(state, client_id.to_owned(), request).await
        }
        (&Method::GET, "/admin/accounts") => Ok(accounts(state)),
        (&Method::POST, "/graphql") => token_endpoint(state, request).await,
        (&Method::GET, p) if p.ends_with("/.well-known/jwks.json") => Ok(jwks(state, p)),
        _ => Ok(json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#)),
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, super::BoxError> {
    Ok(Limited::new(request.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await?
        .to_bytes())
}

/// `POST /admin/accounts/{client_id}/secret` with the new secret as the body.
async fn reset_secret(
    state: &State,
    client_id: String,
    request: Request<Incoming>,
) -> Result<Response<StubBody>, super::BoxError> {
    let body = read_body(request).await?;
    let secret = String::from_utf8_lossy(&body).trim().to_owned();
    if secret.is_empty() {
        return Ok(json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"send the new secret as the body"}"#,
        ));
    }
    if state.reset_secret(&client_id, &secret) {
        tracing::info!(client_id, "stand-in: client secret reset");
        let body = json!({"client_id": client_id, "status": "secret reset"});
        Ok(json(StatusCode::OK, body.to_string()))
    } else {
        Ok(json(
            StatusCode::NOT_FOUND,
            r#"{"error":"no such client id"}"#,
        ))
    }
}

/// `POST /admin/rotate-key[?retire=true]`, with a PKCS#8 PEM RSA key as the body, or an
/// empty body for the stand-in's other bundled key.
async fn rotate_key(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<StubBody>, super::BoxError> {
    let retire = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "retire=true" || p == "retire=1"));
    let body = read_body(request).await?;
    let key = if body.iter().all(u8::is_ascii_whitespace) {
        let current = state
            .keys
            .lock()
            .expect("keys lock")
            .current
            .kid()
            .to_owned();
        let next = SigningKey::bundled_next();
        if next.kid() == current {
            SigningKey::bundled()
        } else {
            next
        }
    } else {
        match SigningKey::from_pem(&body) {
            Ok(key) => key,
            Err(error) => {
                let body = json!({"error": format!("not a PKCS#8 PEM RSA key: {error}")});
                return Ok(json(StatusCode::BAD_REQUEST, body.to_string()));
            }
        }
    };
    let (kid, previous) = state.rotate(key, retire);
    tracing::info!(
        kid,
        previous,
        retired = retire,
        "stand-in: signing key rotated"
    );
    let body = json!({"kid": kid, "previous": previous, "previous_published": !retire});
    Ok(json(StatusCode::OK, body.to_string()))
}

/// `GET /admin/accounts`: client ids and permissions, never secrets.
fn accounts(state: &State) -> Response<StubBody> {
    let settings = state.settings.lock().expect("settings lock");
    let list: Vec<Value> = settings
        .accounts
        .iter()
        .map(|a| json!({"client_id": a.client_id, "name": a.name, "permissions": a.permissions}))
        .collect();
    json(StatusCode::OK, json!({"accounts": list}).to_string())
}

fn jwks(state: &State, path: &str) -> Response<StubBody> {
    let settings = state.settings.lock().expect("settings lock");
    let expected = format!(
        "/{}/{}/.well-known/jwks.json",
        settings.tenant_id, settings.environment_id
    );
    if path != expected {
        return json(StatusCode::NOT_FOUND, r#"{"error":"unknown environment"}"#);
    }
    json(StatusCode::OK, {
        let keys = state.keys.lock().expect("keys lock");
        let published: Vec<Value> = std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .map(|k| k.jwk())
            .collect();
        json!({ "keys": published }).to_string()
    })
}

fn current_fault(state: &State, n: u64) -> Option<Fault> {
    let faults = state.faults.lock().expect("faults lock");
    let every = faults.every.max(1);
    faults.fault.clone().filter(|_| n.is_multiple_of(every))
}

async fn token_endpoint(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<StubBody>, super::BoxError> {
    let n = state.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let body = Limited::new(request.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await?
        .to_bytes();
    match current_fault(state, n) {
        None => {}
        Some(Fault::Http500) => {
            let mut r = Response::new(full("<html><body>Internal Server Error</body></html>"));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return Ok(r);
        }
        Some(Fault::Garbage) => return Ok(json(StatusCode::OK, "<html>not json")),
        Some(Fault::Reset) => return Err("connection reset by the fault mode".into()),
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return Err("hung".into());
        }
        Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::Error(code)) => {
            let body = super::error_body(
                &code,
                "Fault injected by the stand-in",
                Some(mosaic::TOKEN_OPERATION),
                "authenticateServiceAccount",
            );
            return Ok(json(StatusCode::OK, body));
        }
        Some(Fault::NullData) => return Ok(json(StatusCode::OK, r#"{"data":null}"#)),
        Some(Fault::NullPayload) => {
            return Ok(json(
                StatusCode::OK,
                r#"{"data":{"authenticateServiceAccount":null}}"#,
            ))
        }
        Some(Fault::SameToken) => {
            if let Some(reply) = state.last_reply.lock().expect("reply lock").clone() {
                return Ok(json(StatusCode::OK, reply));
            }
        }
        Some(Fault::Huge) => {
            let filler = " ".repeat(1024 * 1024);
            return Ok(json(StatusCode::OK, format!("{{{filler}}}")));
        }
    }
    Ok(login(state, &body))
}

fn validation_failed(message: &str) -> Response<StubBody> {
    let body = json!({"errors": [{
        "message": message,
        "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}
    }]});
    json(StatusCode::BAD_REQUEST, body.to_string())
}

fn login(state: &State, body: &Bytes) -> Response<StubBody> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return validation_failed("Body is not a GraphQL request");
    };
    let query = request.get("query").and_then(Value::as_str).unwrap_or("");
    if !query.contains("authenticateServiceAccount") {
        return validation_failed("Unknown operation");
    }
    let variables = request.get("variables");
    let var = |name: &str| variables.and_then(|v| v.get(name)).and_then(Value::as_str);
    let (Some(client_id), Some(secret)) = (var("clientId"), var("clientSecret")) else {
        return validation_failed(
            "Variable \"$clientId\" or \"$clientSecret\" of required type \"String!\" was not provided.",
        );
    };
    let settings = state.settings.lock().expect("settings lock").clone();
    let refuse = |code: ErrorCode, message: &str| {
        json(
            StatusCode::OK,
            super::error_body(
                &code,
                message,
                Some(mosaic::TOKEN_OPERATION),
                "authenticateServiceAccount",
            ),
        )
    };
    let Some(account) = settings.accounts.iter().find(|a| a.client_id == client_id) else {
        return refuse(
            ErrorCode::InvalidClientIdSecret,
            "Invalid Client ID or Client Secret",
        );
    };
    if !account.has_secret(secret) {
        return refuse(
            ErrorCode::InvalidClientIdSecret,
            "Invalid Client ID or Client Secret",
        );
    }
    let lifetime = settings.lifetime.as_secs().max(1);
    // Like Mosaic: iat in whole seconds (truncated), exp = iat + expiresInSeconds.
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = json!({
        "iss": mosaic::ISSUER,
        "sub": account.subject(),
        "aud": "*",
        "iat": iat,
        "exp": iat + lifetime,
        "tenantId": settings.tenant_id,
        "environmentId": settings.environment_id,
        "name": account.name,
        "subjectType": "ServiceAccount",
        "permissions": account.permissions,
        // Not a Mosaic claim; it keeps two tokens issued in the same second apart.
        "jti": format!("{:016x}", rand::random::<u64>()),
    });
    let key = state.keys.lock().expect("keys lock").current.clone();
    let token = key.sign(&claims);
    state.tokens_issued.fetch_add(1, Ordering::SeqCst);
    let reply = json!({"data": {"authenticateServiceAccount": {
        "accessToken": token,
        "expiresInSeconds": lifetime,
        "tokenType": "Bearer",
        "__typename": "AuthenticateServiceAccountPayload"
    }}})
    .to_string();
    *state.last_reply.lock().expect("reply lock") = Some(reply.clone());
    json(StatusCode::OK, reply)
}
