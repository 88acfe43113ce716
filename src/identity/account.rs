//! One service account: its secret, its cached token (one writer, lock-free readers), and
//! the signals between request path and refresher.

use super::breaker::{Breaker, BreakerPolicy, Verdict};
use super::client::IdentityError;
use super::token::Token;
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
pub(super) struct Progress {
    /// A token request is under way or about to be.
    pub(super) fetching: bool,
    /// The last request failed, and why; `None` after a success.
    pub(super) failure: Option<Arc<IdentityError>>,
    /// When the refresher will ask next, if it is waiting.
    pub(super) next_attempt: Option<Instant>,
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

/// Why the refresher should ask for a token before its schedule says so.
#[derive(Debug, Default)]
pub(super) struct Wake {
    pub(super) notify: Notify,
    /// An upstream refused the current token.
    pub(super) rejected: AtomicBool,
    /// The client secret changed.
    pub(super) secret_changed: AtomicBool,
}

/// One named service account and its current token.
#[derive(Debug)]
pub struct Account {
    pub(super) name: String,
    pub(super) client_id: String,
    secret: ArcSwap<Secret>,
    secret_source: SecretSource,
    pub(super) current: ArcSwapOption<Token>,
    pub(super) progress: watch::Sender<Progress>,
    pub(super) wake: Wake,
    breaker: Mutex<Breaker>,
}

impl Account {
    /// Creates an account with no token yet; the refresher obtains the first one.
    pub fn new(
        name: impl Into<String>,
        client_id: impl Into<String>,
        secret: Secret,
        secret_source: SecretSource,
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
            wake: Wake::default(),
            breaker: Mutex::new(Breaker::new(breaker)),
        }
    }

    /// Returns the account's name from the configuration.
    pub fn name(&self) -> &str {
        &self.name
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
                return Err(self.unavailable());
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

    /// Replaces the cached token. In a running proxy the refresher is the only caller.
    pub fn install(&self, token: Token) {
        self.current.store(Some(Arc::new(token)));
    }

    /// Records that an upstream refused the token `sent`: unless the breaker holds, the
    /// token is dropped if it is still the current one (a newer one is kept) and the
    /// refresher is woken; everyone then shares its one token request.
    pub fn reject(&self, sent: &HeaderValue) -> Rejection {
        let verdict = self
            .breaker
            .lock()
            .expect("breaker lock")
            .on_rejection(sent, Instant::now());
        match verdict {
            Verdict::Hold { opened: true } => {
                tracing::error!(
                    account = %self.name,
                    "upstreams keep refusing fresh tokens of this account (a permission or routing problem?); passing their answers through without refreshing for a while"
                );
                return Rejection::Held;
            }
            Verdict::Hold { opened: false } => return Rejection::Held,
            Verdict::React => {}
        }
        let current = self.current.load();
        if let Some(token) = current.as_deref().filter(|t| t.header() == sent) {
            let previous = self.current.compare_and_swap(&current, None::<Arc<Token>>);
            if previous.as_ref().is_some_and(|p| std::ptr::eq(&**p, token)) {
                tracing::info!(
                    account = %self.name,
                    token = token.fingerprint(),
                    "an upstream refused the token; refreshing"
                );
                self.progress.send_modify(|p| p.fetching = true);
                self.wake.rejected.store(true, Ordering::SeqCst);
                self.wake.notify.notify_one();
            }
        }
        Rejection::Refresh
    }

    /// Records the token obtained in answer to a rejection.
    pub(super) fn record_cure(&self, header: HeaderValue) {
        self.breaker.lock().expect("breaker lock").on_cure(header);
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
        if fresh.expose() == self.secret.load().expose() {
            return Ok(false);
        }
        self.secret.store(Arc::new(fresh));
        tracing::info!(account = %self.name, "the client secret changed; requesting a token with it");
        self.wake.secret_changed.store(true, Ordering::SeqCst);
        self.wake.notify.notify_one();
        Ok(true)
    }
}
