//! One service account: its secret, its cached token (one writer, lock-free readers), and
//! the signals between request path and refresher.

use super::breaker::BreakerPolicy;
use super::client::IdentityError;
use super::lifecycle::{Arrival, Lifecycle, Refusal};
use super::refresh::RetryPolicy;
use super::stats::{AccountStats, TokenOutcome};
use super::token::Token;
use crate::error_chain;
use crate::secret::{read_secret_file, Secret, SecretSource};
use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// What the refresher last did, watched by requests that wait for a token and by readiness.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// A token request is under way or about to be.
    fetching: bool,
    /// The last request failed, and why; `None` after a success.
    failure: Option<Arc<IdentityError>>,
    /// When the refresher will ask next, if it is waiting.
    next_attempt: Option<Instant>,
}

/// Why a request cannot be given a token now.
#[derive(Clone, Debug)]
pub struct TokenUnavailable {
    /// The last failure of the identity service, if any.
    pub failure: Option<Arc<IdentityError>>,
    /// How long until the next token request, rounded up to a whole second, at least one.
    pub retry_after_secs: u64,
}

/// What the proxy should do after an upstream refused a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// A new token is (or already was) on its way: wait for it and replay if allowed.
    Refresh,
    /// The breaker is open: pass the upstream's answer through.
    Held,
}

/// How far `exp` may disagree with `expiresInSeconds` before a warning; Mosaic's
/// truncation of `iat` to the second alone accounts for one.
const CLOCK_WARNING_SECS: f64 = 5.0;

/// One named service account and its current token. The token is written only here, as
/// the account's [`Lifecycle`] decides: when the refresher reports a token request's
/// outcome ([`Account::settle`]) and when an upstream refuses the token ([`Account::reject`]).
#[derive(Debug)]
pub struct Account {
    name: String,
    client_id: String,
    secret: ArcSwap<Secret>,
    secret_source: SecretSource,
    current: ArcSwapOption<Token>,
    progress: watch::Sender<Progress>,
    /// Wakes the refresher for a token request now (a rejection, a new secret).
    wake: Notify,
    lifecycle: Mutex<Lifecycle>,
    /// Set once the clock warning was given, so it is given once.
    warned_clock: AtomicBool,
    stats: AccountStats,
}

/// How an account stands, for readiness, metrics and the status page; never the token.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AccountStatus {
    pub account: String,
    pub client_id: String,
    /// `ready` (a usable token), `failing` (none, and the last request failed) or `waiting`
    /// (none yet, no failure).
    pub state: &'static str,
    /// The fingerprint of the cached token (the first 8 hex digits of its SHA-256).
    pub fingerprint: Option<String>,
    /// Seconds until the cached token expires; negative once it has.
    pub expires_in_s: Option<f64>,
    /// Milliseconds since the Unix epoch at which the cached token expires.
    pub expires_at_ms: Option<u64>,
    /// Seconds until the next token request, if one is scheduled.
    pub next_refresh_in_s: Option<f64>,
    /// Milliseconds since the Unix epoch of the next token request.
    pub next_refresh_at_ms: Option<u64>,
    /// The last token request's failure, if it failed.
    pub last_error: Option<String>,
    /// Upstreams kept refusing fresh tokens: refusals pass through without a refresh.
    pub breaker_open: bool,
}

impl Account {
    /// Creates an account with no token yet; the refresher obtains the first one.
    pub fn new(
        name: impl Into<String>,
        client_id: impl Into<String>,
        secret: Secret,
        secret_source: SecretSource,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
    ) -> Account {
        let progress = Progress {
            fetching: true,
            ..Progress::default()
        };
        Account {
            name: name.into(),
            client_id: client_id.into(),
            secret: ArcSwap::from_pointee(secret),
            secret_source,
            current: ArcSwapOption::empty(),
            progress: watch::channel(progress).0,
            wake: Notify::new(),
            lifecycle: Mutex::new(Lifecycle::new(retry, breaker)),
            warned_clock: AtomicBool::new(false),
            stats: AccountStats::default(),
        }
    }

    /// Creates an account that holds `token` from the start, with default policies and no
    /// refresher (benchmarks and tests of the request path).
    pub fn with_token(name: impl Into<String>, token: Token) -> Account {
        let name = name.into();
        let account = Account::new(
            name.clone(),
            name,
            Secret::new("unused"),
            SecretSource::Inline,
            RetryPolicy::default(),
            BreakerPolicy::default(),
        );
        account.current.store(Some(Arc::new(token)));
        account.progress.send_modify(|p| p.fetching = false);
        account
    }

    /// Returns the account's name from the configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the account's Client ID.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Returns the current client secret.
    pub fn secret(&self) -> Arc<Secret> {
        self.secret.load_full()
    }

    /// Returns where the secret comes from.
    pub fn secret_source(&self) -> &SecretSource {
        &self.secret_source
    }

    /// Returns the `Authorization` value to inject now, if a usable token is cached.
    ///
    /// This is the hot path: one atomic load, one comparison, one reference-count increment.
    #[inline]
    pub fn usable_header(&self) -> Option<HeaderValue> {
        let guard = self.current.load();
        match guard.as_deref() {
            Some(token) if token.is_usable_at(Instant::now()) => Some(token.header().clone()),
            _ => None,
        }
    }

    /// Names the token in `header` by its fingerprint: the cached token's, if it is the one,
    /// otherwise (a token replaced since) computed.
    pub fn fingerprint_of(&self, header: &HeaderValue) -> String {
        let current = self.current.load();
        match current.as_deref().filter(|t| t.header() == header) {
            Some(token) => token.fingerprint().to_owned(),
            None => {
                let text = header.to_str().unwrap_or_default();
                crate::secret::fingerprint(text.trim_start_matches("Bearer "))
            }
        }
    }

    /// Returns the account's counters and timeline.
    pub fn stats(&self) -> &AccountStats {
        &self.stats
    }

    /// Describes how the account stands now.
    pub fn status(&self) -> AccountStatus {
        let now = Instant::now();
        let wall_ms = super::stats::now_ms() as f64;
        let at_ms = |at: Instant| {
            let delta = if at >= now {
                (at - now).as_secs_f64()
            } else {
                -(now - at).as_secs_f64()
            };
            (delta, (wall_ms + delta * 1e3).max(0.0) as u64)
        };
        let token = self.current.load_full();
        let (failure, next_attempt) = {
            let progress = self.progress.borrow();
            (progress.failure.clone(), progress.next_attempt)
        };
        let usable = token.as_deref().is_some_and(|t| t.is_usable_at(now));
        let state = match (usable, &failure) {
            (true, _) => "ready",
            (false, Some(_)) => "failing",
            (false, None) => "waiting",
        };
        let expiry = token.as_deref().map(|t| at_ms(t.expires_at()));
        let next = next_attempt.filter(|at| *at >= now).map(at_ms);
        AccountStatus {
            account: self.name.clone(),
            client_id: self.client_id.clone(),
            state,
            fingerprint: token.as_deref().map(|t| t.fingerprint().to_owned()),
            expires_in_s: expiry.map(|e| e.0),
            expires_at_ms: expiry.map(|e| e.1),
            next_refresh_in_s: next.map(|n| n.0),
            next_refresh_at_ms: next.map(|n| n.1),
            last_error: failure.map(|f| error_chain(&*f)),
            breaker_open: self.lifecycle().breaker_open(now),
        }
    }

    /// Returns the usable token, waiting up to `wait` while a token request is under way.
    pub async fn header_or_wait(&self, wait: Duration) -> Result<HeaderValue, TokenUnavailable> {
        if let Some(header) = self.usable_header() {
            return Ok(header);
        }
        let mut progress = self.progress.subscribe();
        let deadline = Instant::now() + wait;
        loop {
            if let Some(header) = self.usable_header() {
                return Ok(header);
            }
            if !progress.borrow_and_update().fetching {
                // A token request that ended between the two looks stored its token first.
                return self.usable_header().ok_or_else(|| self.unavailable());
            }
            match tokio::time::timeout_at(deadline, progress.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Err(self.unavailable()),
            }
        }
    }

    /// Waits until a usable token is cached, across failed attempts, until `deadline`.
    /// Returns whether one is.
    pub async fn wait_ready(&self, deadline: Instant) -> bool {
        let mut progress = self.progress.subscribe();
        loop {
            if self.is_ready() {
                return true;
            }
            match tokio::time::timeout_at(deadline, progress.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return self.is_ready(),
            }
        }
    }

    /// Tells whether a usable token is cached.
    pub fn is_ready(&self) -> bool {
        self.usable_header().is_some()
    }

    /// Describes why no token is available, for a 503 and its `Retry-After`.
    pub fn unavailable(&self) -> TokenUnavailable {
        let progress = self.progress.borrow();
        let wait = progress
            .next_attempt
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::ZERO);
        TokenUnavailable {
            failure: progress.failure.clone(),
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    /// Records that an upstream refused the token `sent`: unless the breaker holds (or the
    /// identity service keeps handing out that very token), the token is dropped if it is
    /// still the current one (a newer one is kept) and the refresher is woken; everyone then
    /// shares its one token request.
    pub fn reject(&self, sent: &HeaderValue) -> Rejection {
        let current = self.current.load();
        let token = current.as_deref().filter(|t| t.header() == sent);
        let refusal = self
            .lifecycle()
            .rejected(sent, token.is_some(), Instant::now());
        match refusal {
            Refusal::Hold { opened: true } => {
                tracing::error!(
                    account = %self.name,
                    "upstreams keep refusing fresh tokens of this account (a permission or routing problem?); passing their answers through without refreshing for a while"
                );
                Rejection::Held
            }
            Refusal::Hold { opened: false } | Refusal::Wait => Rejection::Held,
            Refusal::UseNewer => Rejection::Refresh,
            Refusal::RefreshNow => {
                // Dropped and marked as being fetched in one step under the progress lock: a
                // request that finds no token then finds the refresh under way, never neither
                // (it would pass the refusal on instead of waiting for the new token).
                let dropped = self.progress.send_if_modified(|progress| {
                    let previous = self.current.compare_and_swap(&current, None::<Arc<Token>>);
                    let dropped = token.is_some_and(|t| {
                        previous.as_ref().is_some_and(|was| std::ptr::eq(&**was, t))
                    });
                    progress.fetching |= dropped;
                    dropped
                });
                if let (true, Some(token)) = (dropped, token) {
                    tracing::info!(
                        account = %self.name,
                        token = token.fingerprint(),
                        "an upstream refused the token; refreshing"
                    );
                    self.wake.notify_one();
                }
                Rejection::Refresh
            }
        }
    }

    /// Marks a token request as under way, for requests that wait for it.
    pub(super) fn begin_request(&self) {
        self.progress.send_modify(|p| p.fetching = true);
    }

    /// Resolves when a token is wanted before the schedule says so.
    pub(super) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Carries out what the lifecycle decides about a token request's `outcome`; returns
    /// when to ask next. `sample` in `[0, 1)` jitters a retry.
    pub(super) fn settle(&self, outcome: Result<Token, IdentityError>, sample: f64) -> Instant {
        let now = Instant::now();
        let (next, failure) = match outcome {
            Ok(token) => {
                self.stats
                    .token_request(TokenOutcome::Ok, token.fingerprint());
                (self.arrived(token, now, sample), None)
            }
            Err(error) => {
                let outcome = if error.is_permanent() {
                    TokenOutcome::Permanent
                } else {
                    TokenOutcome::Transient
                };
                self.stats.token_request(outcome, error.kind());
                (self.failed(&error, now, sample), Some(Arc::new(error)))
            }
        };
        self.progress.send_modify(|p| {
            p.fetching = false;
            p.failure = failure;
            p.next_attempt = Some(next);
        });
        next
    }

    fn arrived(&self, token: Token, now: Instant, sample: f64) -> Instant {
        let arrival = self
            .lifecycle()
            .arrived(token.header(), token.refresh_at(), now, sample);
        let next = match arrival {
            Arrival::Install {
                next,
                recovered_after,
                ..
            } => {
                tracing::info!(
                    account = %self.name,
                    token = token.fingerprint(),
                    lifetime_s = token.lifetime().as_secs_f32(),
                    refresh_in_s = next.saturating_duration_since(now).as_secs_f32(),
                    recovered_after,
                    "obtained an access token"
                );
                next
            }
            Arrival::BackOff { next, first } => {
                if first {
                    tracing::warn!(account = %self.name, token = token.fingerprint(), "the identity service returned the same token again; backing off");
                }
                next
            }
        };
        if token.clock_gap().abs() > CLOCK_WARNING_SECS
            && !self.warned_clock.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                account = %self.name,
                gap_s = token.clock_gap(),
                "the token's exp disagrees with expiresInSeconds by the local clock; refreshing by the earlier of the two (is this host's clock off?)"
            );
        }
        self.current.store(Some(Arc::new(token)));
        next
    }

    fn failed(&self, error: &IdentityError, now: Instant, sample: f64) -> Instant {
        let usable_for = self
            .current
            .load()
            .as_deref()
            .map(|t| t.usable_until().saturating_duration_since(now))
            .filter(|left| !left.is_zero());
        let retry =
            self.lifecycle()
                .failed(error.is_permanent(), error.kind(), usable_for, now, sample);
        let retry_in_s = retry.next.saturating_duration_since(now).as_secs_f32();
        let still_usable = usable_for.is_some();
        // One line per change of state, not one per try.
        if !retry.new_kind {
            tracing::debug!(account = %self.name, kind = error.kind(), "token request failed again");
        } else if error.is_permanent() {
            tracing::error!(account = %self.name, error = %error_chain(error), retry_in_s, still_usable, "token request refused");
        } else {
            tracing::warn!(account = %self.name, error = %error_chain(error), retry_in_s, still_usable, "token request failed");
        }
        retry.next
    }

    fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the secret again from its source; on a change, stores it and has the refresher
    /// ask for a token at once (the current token stays in use until the new one arrives).
    /// Returns whether it changed.
    pub fn reload_secret(&self) -> Result<bool, String> {
        let fresh = match &self.secret_source {
            SecretSource::File(path) => read_secret_file(path)?,
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(value) if !value.trim().is_empty() => Secret::new(value.trim()),
                _ => return Err(format!("{var} is not set or empty")),
            },
            SecretSource::Inline => return Ok(false),
        };
        Ok(self.replace_secret(fresh))
    }

    /// Has the refresher ask for a token at once, whatever the backoff, if the last token
    /// request failed (after a reload that may have mended the cause). Returns whether it
    /// did.
    pub fn retry_if_failing(&self) -> bool {
        if self.progress.borrow().failure.is_none() {
            return false;
        }
        self.lifecycle().ask_at_once();
        self.wake.notify_one();
        true
    }

    /// Uses `fresh` from now on if it differs from the secret in use, and has the refresher
    /// ask for a token with it at once (the current token stays in use until the new one
    /// arrives). Returns whether it differed.
    pub fn replace_secret(&self, fresh: Secret) -> bool {
        if fresh.expose() == self.secret.load().expose() {
            return false;
        }
        self.secret.store(Arc::new(fresh));
        tracing::info!(account = %self.name, "the client secret changed; requesting a token with it");
        self.lifecycle().ask_at_once();
        self.wake.notify_one();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::client::Grant;
    use crate::identity::refresh::RefreshPolicy;

    fn token(n: u32) -> Token {
        let grant = Grant {
            access_token: Secret::new(format!("token-{n}")),
            lifetime: Duration::from_secs(3600),
            sent_at: Instant::now(),
        };
        Token::new(grant, &RefreshPolicy::default(), 0.5).unwrap()
    }

    /// Requests whose token is refused at the same moment, on several threads: one refresh,
    /// and every one of them waits for its token; none finds neither a token nor a refresh
    /// under way (it would pass the refusal on to its client).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn requests_refused_together_on_several_threads_all_wait_for_the_new_token() {
        for _ in 0..300 {
            let account = Arc::new(Account::with_token("a", token(1)));
            let old = account.usable_header().unwrap();
            let refresher = {
                let account = account.clone();
                tokio::spawn(async move {
                    account.woken().await;
                    account.begin_request();
                    tokio::task::yield_now().await;
                    account.settle(Ok(token(2)), 0.5);
                })
            };
            let start = Arc::new(tokio::sync::Barrier::new(8));
            let refused: Vec<_> = (0..8)
                .map(|_| {
                    let (account, old, start) = (account.clone(), old.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        assert_eq!(account.reject(&old), Rejection::Refresh);
                        account.header_or_wait(Duration::from_secs(5)).await
                    })
                })
                .collect();
            for request in refused {
                let fresh = request.await.unwrap();
                assert!(
                    fresh.is_ok(),
                    "a refused request found no token to wait for"
                );
                assert_ne!(fresh.unwrap(), old);
            }
            refresher.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_an_account_whose_last_token_request_failed_is_asked_again_at_once() {
        let account = Account::with_token("a", token(1));
        assert!(!account.retry_if_failing(), "nothing failed");

        let failed = IdentityError::Status(http::StatusCode::INTERNAL_SERVER_ERROR);
        let next = account.settle(Err(failed), 0.5);
        assert!(next > Instant::now(), "a failure backs off");
        assert!(account.retry_if_failing());
        tokio::time::timeout(Duration::from_millis(1), account.woken())
            .await
            .expect("the refresher is woken before its backoff ends");

        account.settle(Ok(token(2)), 0.5);
        assert!(!account.retry_if_failing(), "the last request succeeded");
    }
}
