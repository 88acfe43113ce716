//! The `authenticateServiceAccount` request, and the classification of every possible reply.

use crate::mosaic::{self, ErrorCode, GraphqlError};
use crate::secret::Secret;
use arc_swap::ArcSwap;
use http::StatusCode;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The longest lifetime taken at face value; longer ones are called broken (31 days).
pub const MAX_LIFETIME: Duration = Duration::from_secs(31 * 24 * 3600);

/// A token as the identity service granted it.
#[derive(Debug)]
pub struct Grant {
    pub access_token: Secret,
    pub lifetime: Duration,
    /// When the request that obtained it was sent: expiry is measured from here.
    pub sent_at: Instant,
}

/// What went wrong with one token request.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot connect to the identity service")]
    Connect(#[source] reqwest::Error),
    #[error("the request to the identity service failed")]
    Request(#[source] reqwest::Error),
    #[error("the identity service did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the identity service answered HTTP {0}")]
    Status(StatusCode),
    #[error(
        "the identity service rejected the token request as invalid ({0}); check identity.origin"
    )]
    Invalid(ErrorCode),
    #[error("the identity service refused the login: {0} ({hint})", hint = refusal_hint(.0))]
    Refused(ErrorCode),
    #[error("the identity service's reply is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("the identity service's reply is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the identity service's reply carries no token (null data or payload)")]
    NoPayload,
    #[error("the identity service's reply has {0}")]
    BadLifetime(LifetimeProblem),
    #[error("the identity service's access token is not a JWT")]
    MalformedToken,
    #[error("the access token had expired when it arrived; check the clocks of this host and the identity service")]
    ExpiredOnArrival,
}

/// Why an `expiresInSeconds` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LifetimeProblem {
    #[error("no expiresInSeconds")]
    Missing,
    #[error("an expiresInSeconds that is not a number")]
    NotANumber,
    #[error("an expiresInSeconds of {0}, not positive")]
    NotPositive(f64),
    #[error("an expiresInSeconds of {0}, longer than 31 days")]
    Absurd(f64),
}

fn refusal_hint(code: &ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidClientIdSecret => "check the account's client_id and client secret",
        ErrorCode::ServiceAccountDoesNotExist => {
            "the service account was deleted or the client_id is wrong"
        }
        ErrorCode::TenantNotActive
        | ErrorCode::EnvironmentNotActive
        | ErrorCode::EnvironmentNotEnabled
        | ErrorCode::EnvironmentNotFound => "the Mosaic tenant or environment is not available",
        ErrorCode::AccessTokenLifetimeInsufficient => {
            "the environment's token lifetime is set too short"
        }
        ErrorCode::NoActiveSigningKey
        | ErrorCode::InternalServerError
        | ErrorCode::UnhandledError => "a fault of the identity service; retrying",
        _ => "see the identity service's documentation of this code",
    }
}

impl IdentityError {
    /// Tells whether asking again cannot help until the secret or the account changes.
    pub fn is_permanent(&self) -> bool {
        match self {
            IdentityError::Invalid(_) => true,
            IdentityError::Refused(code) => !code.is_transient_login_failure(),
            IdentityError::Connect(_)
            | IdentityError::Request(_)
            | IdentityError::Timeout(_)
            | IdentityError::Status(_)
            | IdentityError::NotJson(_)
            | IdentityError::TooLarge(_)
            | IdentityError::NoPayload
            | IdentityError::BadLifetime(_)
            | IdentityError::MalformedToken
            | IdentityError::ExpiredOnArrival => false,
        }
    }

    /// Returns a short, stable name of the failure class, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            IdentityError::Connect(_) => "connect",
            IdentityError::Request(_) => "request",
            IdentityError::Timeout(_) => "timeout",
            IdentityError::Status(_) => "http_status",
            IdentityError::Invalid(_) => "invalid_request",
            IdentityError::Refused(_) => "refused",
            IdentityError::NotJson(_) => "not_json",
            IdentityError::TooLarge(_) => "too_large",
            IdentityError::NoPayload => "no_payload",
            IdentityError::BadLifetime(_) => "bad_lifetime",
            IdentityError::MalformedToken => "malformed_token",
            IdentityError::ExpiredOnArrival => "expired_on_arrival",
        }
    }
}

/// A client of one identity service. Its clones share one HTTP client, which a reload
/// renews (with the TLS files as they are then) for all of them at once.
#[derive(Clone, Debug)]
pub struct IdentityClient {
    http: Arc<ArcSwap<reqwest::Client>>,
    url: reqwest::Url,
    timeout: Duration,
    max_reply_bytes: u64,
}

/// Resolves `identity.tls.server_name` to the addresses of the origin's host, looked up
/// anew for each connection (a service behind a load balancer moves); any other name (a
/// proxy's, say) as itself.
struct OriginHost {
    server_name: String,
    host: String,
}

impl reqwest::dns::Resolve for OriginHost {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = if name.as_str().eq_ignore_ascii_case(&self.server_name) {
            self.host.clone()
        } else {
            name.as_str().to_owned()
        };
        Box::pin(async move {
            // The port is the URL's; reqwest puts it on every address.
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl IdentityClient {
    /// Creates a client for the identity service at `origin` (`scheme://authority`).
    ///
    /// With `server_name`, the service is asked for by that name (SNI, certificate check and
    /// `Host`) at the addresses the origin's host has when each connection is opened.
    pub fn new(
        origin: &str,
        timeout: Duration,
        max_reply_bytes: u64,
        tls: rustls::ClientConfig,
        server_name: Option<&str>,
    ) -> Result<IdentityClient, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(timeout)
            // Below the five seconds a Node service keeps an idle connection: token requests
            // are minutes apart, and one written as the service closes would fail.
            .pool_idle_timeout(Duration::from_secs(4))
            .user_agent(concat!("mosaic-auth-proxy/", env!("CARGO_PKG_VERSION")));
        let mut url = reqwest::Url::parse(&format!("{origin}/graphql"))
            .expect("a validated origin joins with /graphql");
        if let Some(name) = server_name {
            let host = url.host_str().unwrap_or_default();
            builder = builder.dns_resolver(OriginHost {
                server_name: name.to_ascii_lowercase(),
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            });
            url.set_host(Some(name))
                .expect("a validated server name is a host");
        }
        let http = Arc::new(ArcSwap::from_pointee(builder.build()?));
        Ok(IdentityClient {
            http,
            url,
            timeout,
            max_reply_bytes,
        })
    }

    /// Makes every clone of this client send its next token requests with `fresh`'s HTTP
    /// client (its TLS files read anew); a request under way finishes on the one it began.
    pub fn renew(&self, fresh: &IdentityClient) {
        self.http.store(fresh.http.load_full());
    }

    /// Requests a token for one account; the whole exchange is bounded by the timeout.
    pub async fn request_token(
        &self,
        client_id: &str,
        secret: &Secret,
    ) -> Result<Grant, IdentityError> {
        let sent_at = Instant::now();
        let exchange = async {
            let body = serde_json::json!({
                "operationName": mosaic::TOKEN_OPERATION,
                "variables": {"clientId": client_id, "clientSecret": secret.expose()},
                "query": mosaic::TOKEN_QUERY,
            });
            let http = self.http.load_full();
            let mut response = http
                .post(self.url.clone())
                .json(&body)
                .send()
                .await
                .map_err(classify_transport)?;
            let status = response.status();
            if response
                .content_length()
                .is_some_and(|n| n > self.max_reply_bytes)
            {
                return Err(IdentityError::TooLarge(self.max_reply_bytes));
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(IdentityError::Request)? {
                if (bytes.len() + chunk.len()) as u64 > self.max_reply_bytes {
                    return Err(IdentityError::TooLarge(self.max_reply_bytes));
                }
                bytes.extend_from_slice(&chunk);
            }
            parse_reply(status, &bytes)
        };
        let (access_token, lifetime) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| IdentityError::Timeout(self.timeout))??;
        Ok(Grant {
            access_token,
            lifetime,
            sent_at,
        })
    }
}

fn classify_transport(e: reqwest::Error) -> IdentityError {
    if e.is_connect() {
        IdentityError::Connect(e)
    } else {
        IdentityError::Request(e)
    }
}

/// Classifies one reply of the identity service: a token and its lifetime, or why not.
pub fn parse_reply(status: StatusCode, body: &[u8]) -> Result<(Secret, Duration), IdentityError> {
    if status.is_server_error() {
        return Err(IdentityError::Status(status));
    }
    let reply: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) if status != StatusCode::OK => return Err(IdentityError::Status(status)),
        Err(e) => return Err(IdentityError::NotJson(e)),
    };
    if let Some(first) = reply
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|errors| errors.first())
    {
        let code = serde_json::from_value::<GraphqlError>(first.clone())
            .ok()
            .and_then(|e| e.code())
            .unwrap_or(ErrorCode::UnhandledError);
        return Err(
            if status == StatusCode::BAD_REQUEST || code == ErrorCode::GraphqlValidationFailed {
                IdentityError::Invalid(code)
            } else {
                IdentityError::Refused(code)
            },
        );
    }
    if status != StatusCode::OK {
        return Err(IdentityError::Status(status));
    }
    let payload = reply
        .get("data")
        .and_then(|d| d.get("authenticateServiceAccount"))
        .filter(|p| p.is_object())
        .ok_or(IdentityError::NoPayload)?;
    let token = payload
        .get("accessToken")
        .and_then(Value::as_str)
        .ok_or(IdentityError::NoPayload)?;
    if !looks_like_jwt(token) {
        return Err(IdentityError::MalformedToken);
    }
    let lifetime = match payload.get("expiresInSeconds") {
        None | Some(Value::Null) => {
            return Err(IdentityError::BadLifetime(LifetimeProblem::Missing))
        }
        Some(v) => v
            .as_f64()
            .ok_or(IdentityError::BadLifetime(LifetimeProblem::NotANumber))?,
    };
    if lifetime.is_nan() || lifetime < 1.0 {
        return Err(IdentityError::BadLifetime(LifetimeProblem::NotPositive(
            lifetime,
        )));
    }
    if lifetime > MAX_LIFETIME.as_secs_f64() {
        return Err(IdentityError::BadLifetime(LifetimeProblem::Absurd(
            lifetime,
        )));
    }
    Ok((
        Secret::new(token),
        Duration::from_secs(lifetime.floor() as u64),
    ))
}

/// Three non-empty base64url parts joined by dots: what a JWS compact token is.
fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::dns::{Name, Resolve};
    use std::str::FromStr;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";

    #[tokio::test]
    async fn the_server_name_resolves_to_the_origins_host_and_other_names_to_themselves() {
        let resolver = OriginHost {
            server_name: "id.internal".to_owned(),
            host: "127.0.0.2".to_owned(),
        };
        let resolve = |name: &str| resolver.resolve(Name::from_str(name).unwrap());
        let addrs: Vec<_> = resolve("ID.Internal").await.unwrap().collect();
        assert_eq!(addrs, ["127.0.0.2:0".parse().unwrap()]);
        let addrs: Vec<_> = resolve("127.0.0.3").await.unwrap().collect();
        assert_eq!(addrs, ["127.0.0.3:0".parse().unwrap()]);
    }

    fn ok(body: &str) -> Result<(Secret, Duration), IdentityError> {
        parse_reply(StatusCode::OK, body.as_bytes())
    }

    #[test]
    fn a_mosaic_success_reply_yields_the_token_and_lifetime() {
        let body = format!(
            r#"{{"data":{{"authenticateServiceAccount":{{"accessToken":"{JWT}","expiresInSeconds":3600,"tokenType":"Bearer","__typename":"X"}}}}}}"#
        );
        let (token, lifetime) = ok(&body).unwrap();
        assert_eq!(token.expose(), JWT);
        assert_eq!(lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn credential_errors_are_permanent_and_server_errors_transient() {
        // Verbatim in shape: shared/mosaic-protocol.md §2.
        let refused = r#"{"errors":[{"message":"Invalid Client ID or Client Secret","locations":[{"line":1,"column":72}],"path":["authenticateServiceAccount"],"extensions":{"timestamp":"2026-11-29T02:00:00.000Z","operationName":"GetServiceToken","exception":{"code":"INVALID_CLIENT_ID_SECRET"}},"timestamp":"2026-11-29T02:00:00.000Z","code":"INVALID_CLIENT_ID_SECRET","details":{}}],"data":null}"#;
        let err = ok(refused).unwrap_err();
        assert!(matches!(
            err,
            IdentityError::Refused(ErrorCode::InvalidClientIdSecret)
        ));
        assert!(err.is_permanent());
        let internal = r#"{"errors":[{"message":"Internal server error","path":["authenticateServiceAccount"],"extensions":{"exception":{"code":"INTERNAL_SERVER_ERROR"}},"code":"INTERNAL_SERVER_ERROR","details":{}}],"data":null}"#;
        assert!(!ok(internal).unwrap_err().is_permanent());
        let unknown = r#"{"errors":[{"message":"new","code":"SOMETHING_NEW"}],"data":null}"#;
        let err = ok(unknown).unwrap_err();
        assert!(
            !err.is_permanent(),
            "an unknown code is retried with backoff: {err}"
        );
    }

    #[test]
    fn a_validation_failure_is_permanent() {
        let body =
            r#"{"errors":[{"message":"bad","extensions":{"code":"GRAPHQL_VALIDATION_FAILED"}}]}"#;
        let err = parse_reply(StatusCode::BAD_REQUEST, body.as_bytes()).unwrap_err();
        assert!(matches!(
            err,
            IdentityError::Invalid(ErrorCode::GraphqlValidationFailed)
        ));
        assert!(err.is_permanent());
    }

    #[test]
    fn broken_replies_are_transient_and_named() {
        let cases: [(StatusCode, &str, &str); 9] = [
            (StatusCode::BAD_GATEWAY, "<html>", "http_status"),
            (StatusCode::OK, "<html>", "not_json"),
            (StatusCode::OK, r#"{"data":null}"#, "no_payload"),
            (
                StatusCode::OK,
                r#"{"data":{"authenticateServiceAccount":null}}"#,
                "no_payload",
            ),
            (
                StatusCode::OK,
                r#"{"data":{"authenticateServiceAccount":{"accessToken":"x y","expiresInSeconds":60}}}"#,
                "malformed_token",
            ),
            (
                StatusCode::OK,
                &format!(
                    r#"{{"data":{{"authenticateServiceAccount":{{"accessToken":"{JWT}"}}}}}}"#
                ),
                "bad_lifetime",
            ),
            (
                StatusCode::OK,
                &format!(
                    r#"{{"data":{{"authenticateServiceAccount":{{"accessToken":"{JWT}","expiresInSeconds":0}}}}}}"#
                ),
                "bad_lifetime",
            ),
            (
                StatusCode::OK,
                &format!(
                    r#"{{"data":{{"authenticateServiceAccount":{{"accessToken":"{JWT}","expiresInSeconds":-5}}}}}}"#
                ),
                "bad_lifetime",
            ),
            (
                StatusCode::OK,
                &format!(
                    r#"{{"data":{{"authenticateServiceAccount":{{"accessToken":"{JWT}","expiresInSeconds":1e12}}}}}}"#
                ),
                "bad_lifetime",
            ),
        ];
        for (status, body, kind) in cases {
            let err = parse_reply(status, body.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), kind, "{body}");
            assert!(!err.is_permanent(), "{body}");
        }
    }

    #[test]
    fn error_messages_never_contain_the_token() {
        let body = format!(
            r#"{{"data":{{"authenticateServiceAccount":{{"accessToken":"{JWT}","expiresInSeconds":"soon"}}}}}}"#
        );
        let err = ok(&body).unwrap_err();
        assert!(!err.to_string().contains(JWT));
        assert!(!format!("{err:?}").contains(JWT));
    }
}
