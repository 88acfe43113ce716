//! The refresher: one task per account, the only writer of its token, so exactly one token
//! request per account is ever in flight.

use super::account::Account;
use super::client::{Grant, IdentityClient, IdentityError};
use super::refresh::RefreshPolicy;
use super::token::Token;
use crate::secret::Secret;
use crate::shutdown::Shutdown;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How often a file secret is read again to notice a rotation.
pub const DEFAULT_SECRET_POLL: Duration = Duration::from_secs(5);

/// The timing rules of [`keep_fresh`].
#[derive(Clone, Debug)]
pub struct Policies {
    pub refresh: RefreshPolicy,
    /// A random number in `[0, 1)` for each jitter (fixed in tests).
    pub sample: fn() -> f64,
}

impl Default for Policies {
    fn default() -> Policies {
        Policies {
            refresh: RefreshPolicy::default(),
            sample: rand::random::<f64>,
        }
    }
}

/// Where tokens come from: the identity service, or a stand-in in tests.
pub trait TokenSource: Send + Sync + 'static {
    /// Asks for a token for `client_id` with `secret`.
    fn request_token(
        &self,
        client_id: &str,
        secret: &Secret,
    ) -> impl Future<Output = Result<Grant, IdentityError>> + Send;
}

impl TokenSource for IdentityClient {
    fn request_token(
        &self,
        client_id: &str,
        secret: &Secret,
    ) -> impl Future<Output = Result<Grant, IdentityError>> + Send {
        IdentityClient::request_token(self, client_id, secret)
    }
}

/// Keeps one account's token fresh until shutdown: asks `source` for a token when the
/// account's lifecycle says, or at once when it is woken.
pub async fn keep_fresh(
    account: Arc<Account>,
    source: impl TokenSource,
    policies: Policies,
    mut shutdown: Shutdown,
) {
    loop {
        account.begin_request();
        let secret = account.secret();
        let attempt = tokio::select! {
            result = source.request_token(account.client_id(), &secret) => result,
            _ = shutdown.wait() => return,
        };
        let outcome =
            attempt.and_then(|grant| Token::new(grant, &policies.refresh, (policies.sample)()));
        let next = account.settle(outcome, (policies.sample)());
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = account.woken() => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// Watches a file secret for rotation (including the Kubernetes `..data` symlink swap,
/// which changes the content behind an unchanged path) by reading it every `every`.
pub async fn watch_secret_file(account: Arc<Account>, every: Duration, mut shutdown: Shutdown) {
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        match account.reload_secret() {
            Ok(_) => last_error = None,
            Err(error) => {
                if last_error.as_ref() != Some(&error) {
                    tracing::warn!(account = %account.name(), %error, "the secret file cannot be read; keeping the secret in use");
                }
                last_error = Some(error);
            }
        }
    }
}
