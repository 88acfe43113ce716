//! Facts of the Mosaic protocol shared by the identity client, the proxy and the stand-ins.

use serde::Deserialize;
use std::fmt;

/// The GraphQL document the official Mosaic client sends to obtain a service-account token.
pub const TOKEN_QUERY: &str =
    "mutation GetServiceToken($clientId: String!, $clientSecret: String!) { \
authenticateServiceAccount(input: {clientId: $clientId, clientSecret: $clientSecret}) { \
accessToken expiresInSeconds tokenType __typename } }";

/// The operation name of [`TOKEN_QUERY`].
pub const TOKEN_OPERATION: &str = "GetServiceToken";

/// The issuer Mosaic puts in every access token.
pub const ISSUER: &str = "ax-id-service";

/// An error code as Mosaic reports it in `errors[].code`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidClientIdSecret,
    ServiceAccountDoesNotExist,
    TenantNotActive,
    EnvironmentNotActive,
    EnvironmentNotEnabled,
    EnvironmentNotFound,
    NoActiveSigningKey,
    AccessTokenLifetimeInsufficient,
    InternalServerError,
    UnhandledError,
    GraphqlValidationFailed,
    AccessTokenExpired,
    AccessTokenRequired,
    AccessTokenVerificationFailed,
    SigningKeyNotFound,
    JwksError,
    IdentityServiceNotAccessible,
    UserNotAuthorized,
    /// A code this proxy does not know; kept verbatim (it comes from the server, never a secret).
    Other(Box<str>),
}

const KNOWN: [(ErrorCode, &str); 17] = [
    (ErrorCode::InvalidClientIdSecret, "INVALID_CLIENT_ID_SECRET"),
    (
        ErrorCode::ServiceAccountDoesNotExist,
        "SERVICE_ACCOUNT_DOES_NOT_EXIST",
    ),
    (ErrorCode::TenantNotActive, "TENANT_NOT_ACTIVE"),
    (ErrorCode::EnvironmentNotActive, "ENVIRONMENT_NOT_ACTIVE"),
    (ErrorCode::EnvironmentNotEnabled, "ENVIRONMENT_NOT_ENABLED"),
    (ErrorCode::EnvironmentNotFound, "ENVIRONMENT_NOT_FOUND"),
    (ErrorCode::NoActiveSigningKey, "NO_ACTIVE_SIGNING_KEY"),
    (
        ErrorCode::AccessTokenLifetimeInsufficient,
        "ACCESS_TOKEN_LIFETIME_INSUFFICIENT",
    ),
    (ErrorCode::InternalServerError, "INTERNAL_SERVER_ERROR"),
    (ErrorCode::UnhandledError, "UNHANDLED_ERROR"),
    (
        ErrorCode::GraphqlValidationFailed,
        "GRAPHQL_VALIDATION_FAILED",
    ),
    (ErrorCode::AccessTokenExpired, "ACCESS_TOKEN_EXPIRED"),
    (ErrorCode::AccessTokenRequired, "ACCESS_TOKEN_REQUIRED"),
    (
        ErrorCode::AccessTokenVerificationFailed,
        "ACCESS_TOKEN_VERIFICATION_FAILED",
    ),
    (ErrorCode::SigningKeyNotFound, "SIGNING_KEY_NOT_FOUND"),
    (ErrorCode::JwksError, "JWKS_ERROR"),
    (
        ErrorCode::IdentityServiceNotAccessible,
        "IDENTITY_SERVICE_NOT_ACCESSIBLE",
    ),
];

impl ErrorCode {
    /// Reads a code as it appears on the wire.
    pub fn parse(code: &str) -> ErrorCode {
        if code == "USER_NOT_AUTHORIZED" {
            return ErrorCode::UserNotAuthorized;
        }
        KNOWN
            .iter()
            .find(|(_, text)| *text == code)
            .map(|(known, _)| known.clone())
            .unwrap_or_else(|| ErrorCode::Other(code.into()))
    }

    /// Returns the code as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::UserNotAuthorized => "USER_NOT_AUTHORIZED",
            ErrorCode::Other(code) => code,
            known => KNOWN
                .iter()
                .find(|(code, _)| code == known)
                .map(|(_, text)| *text)
                .unwrap_or("UNKNOWN"),
        }
    }

    /// Tells whether a service answering with this code refused the token itself, so that a
    /// fresh token may cure it. `USER_NOT_AUTHORIZED` is not: the token was fine.
    pub fn is_token_rejection(&self) -> bool {
        matches!(
            self,
            ErrorCode::AccessTokenExpired
                | ErrorCode::AccessTokenVerificationFailed
                | ErrorCode::SigningKeyNotFound
                | ErrorCode::AccessTokenRequired
        )
    }

    /// Tells whether a failed login with this code is worth trying again without a new secret.
    /// A code this proxy does not know is: the exponential backoff keeps the tries rare, and a
    /// new transient code must not wait at the slow permanent cadence.
    pub fn is_transient_login_failure(&self) -> bool {
        matches!(
            self,
            ErrorCode::InternalServerError
                | ErrorCode::UnhandledError
                | ErrorCode::NoActiveSigningKey
                | ErrorCode::IdentityServiceNotAccessible
                | ErrorCode::JwksError
                | ErrorCode::Other(_)
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a GraphQL `errors` array, reduced to what the proxy reads.
#[derive(Debug, Deserialize)]
pub struct GraphqlError {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub extensions: Option<Extensions>,
}

/// The `extensions` member of a Mosaic GraphQL error.
#[derive(Debug, Deserialize)]
pub struct Extensions {
    #[serde(default)]
    pub exception: Option<Exception>,
    #[serde(default)]
    pub code: Option<String>,
}

/// The `extensions.exception` member of a Mosaic GraphQL error.
#[derive(Debug, Deserialize)]
pub struct Exception {
    #[serde(default)]
    pub code: Option<String>,
}

impl GraphqlError {
    /// Returns the Mosaic code, wherever in the error object it was put.
    pub fn code(&self) -> Option<ErrorCode> {
        let ext = self.extensions.as_ref();
        self.code
            .as_deref()
            .or_else(|| ext.and_then(|e| e.exception.as_ref()?.code.as_deref()))
            .or_else(|| ext.and_then(|e| e.code.as_deref()))
            .map(ErrorCode::parse)
    }
}

/// Finds the code of a token rejection in a GraphQL reply body, if it holds one.
pub fn token_rejection(body: &[u8]) -> Option<ErrorCode> {
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default)]
        errors: Vec<GraphqlError>,
    }
    // Most replies carry no errors at all: skip parsing them.
    if !body.windows(8).any(|w| w == b"\"errors\"") {
        return None;
    }
    serde_json::from_slice::<Reply>(body)
        .ok()?
        .errors
        .iter()
        .filter_map(GraphqlError::code)
        .find(ErrorCode::is_token_rejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_through_its_wire_form() {
        for (code, text) in KNOWN.iter() {
            assert_eq!(ErrorCode::parse(text), *code);
            assert_eq!(code.as_str(), *text);
        }
        assert_eq!(
            ErrorCode::parse("USER_NOT_AUTHORIZED").as_str(),
            "USER_NOT_AUTHORIZED"
        );
        assert_eq!(ErrorCode::parse("NEW_THING").as_str(), "NEW_THING");
    }

    /// A Mosaic service's answer to a request whose token is refused for `code`, verbatim
    /// in shape (`shared/mosaic-protocol.md` §2, §4): HTTP 200, `data` with nulls.
    fn service_error(code: &str, message: &str) -> String {
        format!(
            r#"{{"errors":[{{"message":"{message}","locations":[{{"line":2,"column":3}}],"path":["getMedia"],"extensions":{{"timestamp":"2026-11-29T02:00:00.000Z","operationName":"GetMedia","exception":{{"code":"{code}"}}}},"timestamp":"2026-11-29T02:00:00.000Z","code":"{code}","details":{{}}}}],"data":{{"getMedia":null}}}}"#
        )
    }

    #[test]
    fn token_rejections_are_found_and_permission_errors_are_not() {
        for (code, message, rejection) in [
            ("ACCESS_TOKEN_EXPIRED", "Access Token has expired.", true),
            ("ACCESS_TOKEN_REQUIRED", "Access Token is required.", true),
            (
                "ACCESS_TOKEN_VERIFICATION_FAILED",
                "Access Token verification failed.",
                true,
            ),
            ("SIGNING_KEY_NOT_FOUND", "Signing key not found.", true),
            (
                "USER_NOT_AUTHORIZED",
                "User is not authorized to access the operation.",
                false,
            ),
            ("JWKS_ERROR", "JWKS error.", false),
        ] {
            let body = service_error(code, message);
            let found = token_rejection(body.as_bytes());
            assert_eq!(found.is_some(), rejection, "{code}");
            if let Some(found) = found {
                assert_eq!(found.as_str(), code);
            }
        }
        assert_eq!(token_rejection(br#"{"data":{"a":1}}"#), None);
        assert_eq!(token_rejection(br#"{"errors": not json"#), None);
    }

    #[test]
    fn the_code_is_found_in_the_top_level_or_in_the_exception() {
        let top: GraphqlError = serde_json::from_str(
            r#"{"message":"Access Token has expired.","code":"ACCESS_TOKEN_EXPIRED","details":{}}"#,
        )
        .unwrap();
        assert_eq!(top.code(), Some(ErrorCode::AccessTokenExpired));
        let nested: GraphqlError = serde_json::from_str(
            r#"{"message":"m","extensions":{"exception":{"code":"SIGNING_KEY_NOT_FOUND"}}}"#,
        )
        .unwrap();
        assert_eq!(nested.code(), Some(ErrorCode::SigningKeyNotFound));
    }
}
