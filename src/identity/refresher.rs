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
    shutdown: Shutdown,
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
pub async fn watch_secret_file(account: Arc<Account>, every: Duration, shutdown: Shutdown) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::breaker::BreakerPolicy;
    use crate::identity::refresh::RetryPolicy;
    use crate::mosaic::ErrorCode;
    use crate::secret::SecretSource;
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// A token source on paused time: notes when it is asked, answers at once.
    struct Fake {
        asked: Arc<Mutex<Vec<Duration>>>,
        start: Instant,
        answer: fn(usize) -> Result<Duration, IdentityError>,
    }

    impl TokenSource for Fake {
        fn request_token(
            &self,
            _client_id: &str,
            _secret: &Secret,
        ) -> impl Future<Output = Result<Grant, IdentityError>> + Send {
            let mut asked = self.asked.lock().unwrap();
            asked.push(self.start.elapsed());
            let n = asked.len();
            let answer = (self.answer)(n).map(|lifetime| Grant {
                access_token: Secret::new(format!("token-{n}")),
                lifetime,
                sent_at: Instant::now(),
            });
            std::future::ready(answer)
        }
    }

    /// Runs a refresher against `answer` for `run` of paused time; returns when it asked.
    async fn asked_at(
        answer: fn(usize) -> Result<Duration, IdentityError>,
        run: Duration,
    ) -> Vec<Duration> {
        let account = Arc::new(Account::new(
            "a",
            "a",
            Secret::new("s"),
            SecretSource::Inline,
            RetryPolicy::default(),
            BreakerPolicy::default(),
        ));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            asked: asked.clone(),
            start: Instant::now(),
            answer,
        };
        let policies = Policies {
            refresh: RefreshPolicy {
                jitter: 0.0,
                ..RefreshPolicy::default()
            },
            sample: || 0.5,
        };
        let (trigger, signal) = crate::shutdown::channel();
        let refresher = tokio::spawn(keep_fresh(account, fake, policies, signal));
        tokio::time::sleep(run).await;
        trigger.trigger();
        refresher.await.unwrap();
        let asked = asked.lock().unwrap().clone();
        asked
    }

    fn ms(list: &[u64]) -> Vec<Duration> {
        list.iter().map(|&n| Duration::from_millis(n)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_two_second_token_is_refreshed_at_its_half_life_exactly() {
        let asked = asked_at(|_| Ok(Duration::from_secs(2)), Duration::from_millis(5500)).await;
        assert_eq!(asked, ms(&[0, 1000, 2000, 3000, 4000, 5000]));
    }

    #[tokio::test(start_paused = true)]
    async fn an_hour_token_is_refreshed_after_three_quarters_of_an_hour() {
        let asked = asked_at(|_| Ok(Duration::from_secs(3600)), Duration::from_secs(5500)).await;
        assert_eq!(asked, ms(&[0, 2_700_000, 5_400_000]));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_back_off_exponentially_up_to_the_cap() {
        let asked = asked_at(
            |_| {
                Err(IdentityError::Status(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                ))
            },
            Duration::from_secs(40),
        )
        .await;
        // Full jitter at its middle: half of 0.5 s, 1 s, 2 s, ... up to half of 30 s.
        assert_eq!(asked, ms(&[0, 250, 750, 1750, 3750, 7750, 15_750, 30_750]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_secret_is_asked_about_once_a_minute() {
        let asked = asked_at(
            |_| Err(IdentityError::Refused(ErrorCode::InvalidClientIdSecret)),
            Duration::from_secs(130),
        )
        .await;
        assert_eq!(asked, ms(&[0, 60_000, 120_000]));
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_outage_the_cadence_follows_the_new_token() {
        let asked = asked_at(
            |n| match n {
                2 | 3 => Err(IdentityError::Status(http::StatusCode::BAD_GATEWAY)),
                _ => Ok(Duration::from_secs(2)),
            },
            Duration::from_millis(3500),
        )
        .await;
        // Token at 0, usable until 1.8 s; the refresh at 1 s fails, the retry at 1.25 s
        // fails, and the next waits only half of the 0.55 s the token has left, not 0.5 s:
        // a token at 1.525 s, refreshed a second later.
        assert_eq!(asked, ms(&[0, 1000, 1250, 1525, 2525]));
    }
}
