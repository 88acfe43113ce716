//! One service account: its cached token (one writer, lock-free readers) and the task that
//! keeps it fresh.

use super::client::{IdentityClient, IdentityError};
use super::refresh::{retry_delay, RefreshPolicy, RetryPolicy};
use super::token::Token;
use crate::secret::Secret;
use crate::shutdown::Shutdown;
use arc_swap::ArcSwapOption;
use http::HeaderValue;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the refresher last did, watched by requests that wait for a token and by readiness.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// A token request is under way.
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

/// One named service account and its current token.
#[derive(Debug)]
pub struct Account {
    name: String,
    client_id: String,
    secret: Secret,
    current: ArcSwapOption<Token>,
    progress: watch::Sender<Progress>,
}

impl Account {
    /// Creates an account with no token yet; [`keep_fresh`] obtains the first one.
    pub fn new(name: impl Into<String>, client_id: impl Into<String>, secret: Secret) -> Account {
        let progress = Progress {
            fetching: true,
            ..Progress::default()
        };
        Account {
            name: name.into(),
            client_id: client_id.into(),
            secret,
            current: ArcSwapOption::empty(),
            progress: watch::channel(progress).0,
        }
    }

    /// Returns the account's name from the configuration.
    pub fn name(&self) -> &str {
        &self.name
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

    /// Returns the usable token, waiting up to `wait` while a token request is under way.
    pub async fn header_or_wait(&self, wait: Duration) -> Result<HeaderValue, TokenUnavailable> {
        if let Some(header) = self.usable_header() {
            return Ok(header);
        }
        let mut progress = self.progress.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(header) = self.usable_header() {
                return Ok(header);
            }
            if !progress.borrow_and_update().fetching {
                return Err(self.unavailable());
            }
            match tokio::time::timeout_at(deadline, progress.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Err(self.unavailable()),
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

    /// Replaces the cached token. In a running proxy [`keep_fresh`] is the only caller.
    pub fn install(&self, token: Token) {
        self.current.store(Some(Arc::new(token)));
    }
}

/// How far `exp` may disagree with `expiresInSeconds` before a warning; Mosaic's
/// truncation of `iat` to the second alone accounts for one.
const CLOCK_WARNING_SECS: f64 = 5.0;

/// The timing rules of [`keep_fresh`].
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub refresh: RefreshPolicy,
    pub retry: RetryPolicy,
}

/// Keeps one account's token fresh until shutdown: the only writer of its cache, so exactly one
/// token request per account is ever in flight.
pub async fn keep_fresh(
    account: Arc<Account>,
    client: IdentityClient,
    policies: Policies,
    mut shutdown: Shutdown,
) {
    let mut failures: u32 = 0;
    let mut last_kind: Option<&'static str> = None;
    let mut warned_clock = false;
    loop {
        account.progress.send_modify(|p| p.fetching = true);
        let attempt = tokio::select! {
            result = client.request_token(&account.client_id, &account.secret) => result,
            _ = shutdown.wait() => return,
        };
        let outcome =
            attempt.and_then(|grant| Token::new(grant, &policies.refresh, rand::random::<f64>()));
        let next = match outcome {
            Ok(token) => {
                tracing::info!(
                    account = %account.name,
                    token = token.fingerprint(),
                    lifetime_s = token.lifetime().as_secs(),
                    refresh_in_s = token.refresh_at().saturating_duration_since(Instant::now()).as_secs_f32(),
                    recovered_after = failures,
                    "obtained an access token"
                );
                if !warned_clock && token.clock_gap().abs() > CLOCK_WARNING_SECS {
                    warned_clock = true;
                    tracing::warn!(
                        account = %account.name,
                        gap_s = token.clock_gap(),
                        "the token's exp disagrees with expiresInSeconds by the local clock; refreshing by the earlier of the two (is this host's clock off?)"
                    );
                }
                let next = token.refresh_at();
                account.install(token);
                failures = 0;
                last_kind = None;
                account.progress.send_modify(|p| {
                    p.fetching = false;
                    p.failure = None;
                    p.next_attempt = Some(next);
                });
                next
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(
                    &policies.retry,
                    error.is_permanent(),
                    failures,
                    rand::random::<f64>(),
                );
                let next = Instant::now() + delay;
                let still_usable = account
                    .current
                    .load()
                    .as_deref()
                    .is_some_and(|t| t.is_usable_at(Instant::now()));
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
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// Renders an error with its sources, `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
