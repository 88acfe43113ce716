//! The refresher: one task per account, the only writer of its token, so exactly one token
//! request per account is ever in flight.

use super::account::Account;
use super::client::IdentityClient;
use super::refresh::{before_expiry, retry_delay, RefreshPolicy, RetryPolicy};
use super::token::Token;
use crate::error_chain;
use crate::shutdown::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How far `exp` may disagree with `expiresInSeconds` before a warning; Mosaic's
/// truncation of `iat` to the second alone accounts for one.
const CLOCK_WARNING_SECS: f64 = 5.0;

/// How often a file secret is read again to notice a rotation.
pub const DEFAULT_SECRET_POLL: Duration = Duration::from_secs(5);

/// The timing rules of [`keep_fresh`].
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub refresh: RefreshPolicy,
    pub retry: RetryPolicy,
}

/// Keeps one account's token fresh until shutdown.
pub async fn keep_fresh(
    account: Arc<Account>,
    client: IdentityClient,
    policies: Policies,
    mut shutdown: Shutdown,
) {
    let mut failures: u32 = 0;
    let mut last_kind: Option<&'static str> = None;
    let mut warned_clock = false;
    let mut warned_same = false;
    // The last token obtained, even if a rejection has since dropped it from the cache.
    let mut last_header: Option<http::HeaderValue> = None;
    // Backing off because the last answer repeated the token: a rejection of that token
    // does not cut the wait short (it would only get the same token again).
    let mut repeating;
    loop {
        let rejected = account.wake.rejected.swap(false, Ordering::SeqCst);
        account.wake.secret_changed.store(false, Ordering::SeqCst);
        account.progress.send_modify(|p| p.fetching = true);
        let secret = account.secret();
        let attempt = tokio::select! {
            result = client.request_token(&account.client_id, &secret) => result,
            _ = shutdown.wait() => return,
        };
        let outcome =
            attempt.and_then(|grant| Token::new(grant, &policies.refresh, rand::random::<f64>()));
        let next = match outcome {
            Ok(token) => {
                let same = last_header.as_ref() == Some(token.header());
                last_header = Some(token.header().clone());
                let mut next = token.refresh_at();
                repeating = same;
                if same {
                    // The identity service handed out the token it gave before: asking
                    // again at once would get it again. Back off instead.
                    failures = failures.saturating_add(1);
                    next = Instant::now()
                        + retry_delay(&policies.retry, false, failures, rand::random::<f64>());
                    if !warned_same {
                        warned_same = true;
                        tracing::warn!(account = %account.name, token = token.fingerprint(), "the identity service returned the same token again; backing off");
                    }
                } else {
                    tracing::info!(
                        account = %account.name,
                        token = token.fingerprint(),
                        lifetime_s = token.lifetime().as_secs_f32(),
                        refresh_in_s = token.refresh_at().saturating_duration_since(Instant::now()).as_secs_f32(),
                        recovered_after = failures,
                        "obtained an access token"
                    );
                    failures = 0;
                    warned_same = false;
                }
                if !warned_clock && token.clock_gap().abs() > CLOCK_WARNING_SECS {
                    warned_clock = true;
                    tracing::warn!(
                        account = %account.name,
                        gap_s = token.clock_gap(),
                        "the token's exp disagrees with expiresInSeconds by the local clock; refreshing by the earlier of the two (is this host's clock off?)"
                    );
                }
                if rejected {
                    account.record_cure(token.header().clone());
                }
                last_kind = None;
                account.install(token);
                account.progress.send_modify(|p| {
                    p.fetching = false;
                    p.failure = None;
                    p.next_attempt = Some(next);
                });
                next
            }
            Err(error) => {
                repeating = false;
                failures = failures.saturating_add(1);
                let now = Instant::now();
                let remaining = account
                    .current
                    .load()
                    .as_deref()
                    .map(|t| t.usable_until().saturating_duration_since(now))
                    .filter(|left| !left.is_zero());
                let mut delay = retry_delay(
                    &policies.retry,
                    error.is_permanent(),
                    failures,
                    rand::random::<f64>(),
                );
                if !error.is_permanent() {
                    delay = before_expiry(delay, remaining, &policies.retry);
                }
                let next = now + delay;
                let still_usable = remaining.is_some();
                // One line per change of state, not one per try.
                if last_kind != Some(error.kind()) {
                    let error_chain = error_chain(&error);
                    if error.is_permanent() {
                        tracing::error!(account = %account.name, error = %error_chain, retry_in_s = delay.as_secs_f32(), still_usable, "token request refused");
                    } else {
                        tracing::warn!(account = %account.name, error = %error_chain, retry_in_s = delay.as_secs_f32(), still_usable, "token request failed");
                    }
                } else {
                    tracing::debug!(account = %account.name, kind = error.kind(), failures, "token request failed again");
                }
                last_kind = Some(error.kind());
                account.progress.send_modify(|p| {
                    p.fetching = false;
                    p.failure = Some(Arc::new(error));
                    p.next_attempt = Some(next);
                });
                next
            }
        };
        // Sleep until the schedule says so, or until a rejection or a new secret needs a
        // token now.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                _ = account.wake.notify.notified() => {
                    if account.wake.secret_changed.load(Ordering::SeqCst)
                        || (account.wake.rejected.load(Ordering::SeqCst) && !repeating)
                    {
                        break;
                    }
                }
                _ = shutdown.wait() => return,
            }
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
                    tracing::warn!(account = %account.name, %error, "the secret file cannot be read; keeping the secret in use");
                }
                last_error = Some(error);
            }
        }
    }
}
