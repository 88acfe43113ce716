//! `token ACCOUNT`: logs an account in once and prints its access token (the Admin Portal's
//! "Generate Access Token"), or with `--decode` its claims and expiry as JSON.

use crate::app::generation::identity_client;
use crate::app::StartError;
use crate::config::Config;
use crate::identity::refresh::RefreshPolicy;
use crate::identity::{IdentityError, Token};
use crate::jwt;
use serde_json::json;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why no token was printed.
#[derive(Debug, thiserror::Error)]
pub enum TokenCommandError {
    #[error("no account {name:?} in the configuration; its accounts are: {known}")]
    NoAccount { name: String, known: String },
    #[error(transparent)]
    Start(#[from] StartError),
    /// Classified as the proxy classifies it (`kind`, and whether retrying can help).
    #[error("the token request failed ({}, {}): {}", .0.kind(), if .0.is_permanent() { "permanent: only a new secret or configuration cures it" } else { "transient: retrying may help" }, crate::error_chain(.0))]
    Identity(#[from] IdentityError),
}

/// What the command prints.
pub enum Printed {
    /// The bare access token.
    Token(String),
    /// The token's header, claims and expiry as JSON (never its signature).
    Decoded(serde_json::Value),
}

/// Requests one token for `account` of `config`.
pub async fn run(
    config: &Config,
    account: &str,
    decode: bool,
) -> Result<Printed, TokenCommandError> {
    let Some(entry) = config.accounts.iter().find(|a| a.name == account) else {
        let known: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        return Err(TokenCommandError::NoAccount {
            name: account.to_owned(),
            known: known.join(", "),
        });
    };
    let client = identity_client(config)?;
    let grant = client
        .request_token(&entry.client_id, &entry.secret)
        .await?;
    let jwt = grant.access_token.expose().to_owned();
    let lifetime = grant.lifetime;
    // The proxy's own checks: a malformed or already expired token is refused the same way.
    let token = Token::new(grant, &RefreshPolicy::default(), 0.0)?;
    if !decode {
        return Ok(Printed::Token(jwt));
    }
    let parts = jwt::decode(&jwt).ok_or(IdentityError::MalformedToken)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let exp = jwt::seconds(&parts.claims, "exp");
    Ok(Printed::Decoded(json!({
        "account": entry.name,
        "client_id": entry.client_id,
        "fingerprint": token.fingerprint(),
        "expires_in_seconds": lifetime.as_secs(),
        "exp": exp,
        "expires_in_s_by_exp": exp.map(|e| e - now),
        "header": parts.header,
        "claims": parts.claims,
    })))
}
