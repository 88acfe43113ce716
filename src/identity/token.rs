//! A cached token: the ready-made `Authorization` value and the instants that bound its use.

use super::client::{Grant, IdentityError};
use super::refresh::{plan, RefreshPolicy};
use crate::jwt;
use crate::secret::fingerprint;
use bytes::Bytes;
use http::HeaderValue;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// One access token, ready to be injected.
pub struct Token {
    header: HeaderValue,
    usable_until: Instant,
    refresh_at: Instant,
    expires_at: Instant,
    lifetime: Duration,
    fingerprint: String,
    clock_gap: f64,
}

impl Token {
    /// Builds the cached form of a grant, planned by `policy`; `sample` in `[0, 1)` jitters it.
    ///
    /// The lifetime is the shorter of `expiresInSeconds`, counted from when the request was
    /// sent, and the token's own `exp` read against the local clock: Mosaic truncates `iat`
    /// to the second, so `exp` can come up to a second before `sent + expiresInSeconds`.
    pub fn new(grant: Grant, policy: &RefreshPolicy, sample: f64) -> Result<Token, IdentityError> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let wall = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let by_exp = jwt::decode(grant.access_token.expose())
            .and_then(|parts| jwt::seconds(&parts.claims, "exp"))
            .map(|exp| (now - grant.sent_at).as_secs_f64() + (exp - wall));
        let granted = grant.lifetime.as_secs_f64();
        let clock_gap = by_exp.map_or(0.0, |by_exp| by_exp - granted);
        let lifetime = match by_exp {
            Some(by_exp) if by_exp < granted => Duration::from_secs_f64(by_exp.max(0.0)),
            _ => grant.lifetime,
        };
        let plan = plan(lifetime, policy, sample);
        if plan.usable_for.is_zero() || grant.sent_at + plan.usable_for <= now {
            return Err(IdentityError::ExpiredOnArrival);
        }
        let fingerprint = fingerprint(grant.access_token.expose());
        let bytes = Bytes::from(format!("Bearer {}", grant.access_token.expose()));
        let mut header =
            HeaderValue::from_maybe_shared(bytes).map_err(|_| IdentityError::MalformedToken)?;
        header.set_sensitive(true);
        // The first clone moves the bytes into shared storage; every request's clone after
        // that is a reference-count increment, never an allocation.
        drop(header.clone());
        Ok(Token {
            header,
            usable_until: grant.sent_at + plan.usable_for,
            refresh_at: grant.sent_at + plan.refresh_after,
            expires_at: grant.sent_at + lifetime,
            lifetime,
            fingerprint,
            clock_gap,
        })
    }

    /// Returns the `Authorization` value, `Bearer <jwt>`, marked sensitive.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// Tells whether the token may still be injected at `now`.
    pub fn is_usable_at(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// Returns the instant after which the token is never injected.
    pub fn usable_until(&self) -> Instant {
        self.usable_until
    }

    /// Returns the instant the next token should be requested.
    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }

    /// Returns the instant the token expires (the earlier of `exp` and `expiresInSeconds`).
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// Returns the lifetime the token is planned with.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Returns how many seconds the token's `exp` lies after (positive) or before (negative)
    /// what `expiresInSeconds` promised, by the local clock.
    pub fn clock_gap(&self) -> f64 {
        self.clock_gap
    }

    /// Returns a short fingerprint of the token, safe to log.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("fingerprint", &self.fingerprint)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::stub::keys::b64;

    fn jwt_expiring_in(secs: f64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let claims = serde_json::json!({"exp": now + secs});
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"k"}"#),
            b64(claims.to_string().as_bytes()),
            b64(b"sig")
        )
    }

    fn token(jwt: &str, lifetime_secs: u64) -> Result<Token, IdentityError> {
        let grant = Grant {
            access_token: Secret::new(jwt),
            lifetime: Duration::from_secs(lifetime_secs),
            sent_at: Instant::now(),
        };
        Token::new(grant, &RefreshPolicy::default(), 0.0)
    }

    #[test]
    fn an_exp_earlier_than_expires_in_seconds_wins() {
        let t = token(&jwt_expiring_in(1000.0), 3600).unwrap();
        assert!(t.lifetime() <= Duration::from_secs(1000));
        assert!(t.lifetime() > Duration::from_secs(998));
        assert!(t.clock_gap() < -2500.0);
    }

    #[test]
    fn an_exp_later_than_expires_in_seconds_is_ignored() {
        let t = token(&jwt_expiring_in(7200.0), 3600).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(3600));
        assert!(t.clock_gap() > 3500.0);
    }

    #[test]
    fn a_token_already_expired_by_its_exp_is_refused() {
        let err = token(&jwt_expiring_in(-5.0), 3600).unwrap_err();
        assert_eq!(err.kind(), "expired_on_arrival");
    }

    #[test]
    fn the_header_is_bearer_and_sensitive() {
        let jwt = jwt_expiring_in(100.0);
        let t = token(&jwt, 100).unwrap();
        assert_eq!(t.header().to_str().unwrap(), format!("Bearer {jwt}"));
        assert!(t.header().is_sensitive());
        assert!(!format!("{t:?}").contains(&jwt));
    }
}
