//! The decisions of one account's token lifecycle, as a pure function of its state, an
//! event and `now`: what to do when a token arrives, when a token request fails, when an
//! upstream refuses the token, and when the secret changes. [`super::Account`] carries the
//! decisions out; the refresher only talks to the identity service and keeps the time.

use super::breaker::{Breaker, BreakerPolicy, Verdict};
use super::refresh::{before_expiry, retry_delay, RetryPolicy};
use http::HeaderValue;
use std::time::Duration;
use tokio::time::Instant;

/// What to do with a token that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Install it and ask again at `next`. `recovered_after` counts the failures before it;
    /// `cure` says it answers a rejection.
    Install {
        next: Instant,
        recovered_after: u32,
        cure: bool,
    },
    /// The identity service handed out the same token again: keep it, but back off until
    /// `next` rather than ask at once. `first` is the first time in a row (warn once).
    BackOff { next: Instant, first: bool },
}

/// When to ask again after a failed token request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub next: Instant,
    /// A change of failure (log it loudly; a repeat is logged quietly).
    pub new_kind: bool,
}

/// What to do about an upstream's refusal of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Drop the refused token (it is the current one) and ask for a new one now; every
    /// request waiting shares that one token request.
    RefreshNow,
    /// The refused token is no longer the current one: use the newer token.
    UseNewer,
    /// The breaker holds: leave the token, pass the refusal through. `opened` marks the
    /// refusal that opened it.
    Hold { opened: bool },
    /// The identity service keeps handing out the refused token: asking again now would
    /// only bring it once more, so the refusal passes through.
    Wait,
}

/// The state of one account's lifecycle.
#[derive(Debug)]
pub struct Lifecycle {
    retry: RetryPolicy,
    breaker: Breaker,
    /// Failed token requests in a row (a repeated token counts as one).
    failures: u32,
    /// The last token obtained, even if a rejection has since dropped it.
    last: Option<HeaderValue>,
    /// Backing off because the identity service repeated its token.
    repeating: bool,
    /// The token request under way answers a rejection.
    answering_rejection: bool,
    /// The kind of the last failure, while failures continue.
    failing: Option<&'static str>,
}

impl Lifecycle {
    /// Starts the lifecycle of an account that holds no token yet.
    pub fn new(retry: RetryPolicy, breaker: BreakerPolicy) -> Lifecycle {
        Lifecycle {
            retry,
            breaker: Breaker::new(breaker),
            failures: 0,
            last: None,
            repeating: false,
            answering_rejection: false,
            failing: None,
        }
    }

    /// Decides about the token `header` that arrived at `now`, planned to be refreshed at
    /// `refresh_at`; `sample` in `[0, 1)` jitters a backoff.
    pub fn arrived(
        &mut self,
        header: &HeaderValue,
        refresh_at: Instant,
        now: Instant,
        sample: f64,
    ) -> Arrival {
        self.failing = None;
        let cure = std::mem::take(&mut self.answering_rejection);
        if cure {
            self.breaker.on_cure(header.clone());
        }
        if self.last.as_ref() == Some(header) {
            // Asking again at once would get the same token again.
            let first = !self.repeating;
            self.repeating = true;
            self.failures = self.failures.saturating_add(1);
            let delay = retry_delay(&self.retry, false, self.failures, sample);
            return Arrival::BackOff {
                next: now + delay,
                first,
            };
        }
        self.last = Some(header.clone());
        self.repeating = false;
        let recovered_after = std::mem::take(&mut self.failures);
        Arrival::Install {
            next: refresh_at,
            recovered_after,
            cure,
        }
    }

    /// Decides when to ask again after a token request failed at `now` with a failure of
    /// `kind`; the cached token is still usable for `usable_for`, if at all.
    pub fn failed(
        &mut self,
        permanent: bool,
        kind: &'static str,
        usable_for: Option<Duration>,
        now: Instant,
        sample: f64,
    ) -> Retry {
        self.repeating = false;
        self.failures = self.failures.saturating_add(1);
        let mut delay = retry_delay(&self.retry, permanent, self.failures, sample);
        if !permanent {
            delay = before_expiry(delay, usable_for, &self.retry);
        }
        let new_kind = self.failing != Some(kind);
        self.failing = Some(kind);
        Retry {
            next: now + delay,
            new_kind,
        }
    }

    /// Decides about an upstream's refusal, at `now`, of the token `sent`; `current` says
    /// whether it is still the cached one.
    pub fn rejected(&mut self, sent: &HeaderValue, current: bool, now: Instant) -> Refusal {
        match self.breaker.on_rejection(sent, now) {
            Verdict::Hold { opened } => Refusal::Hold { opened },
            Verdict::React if self.repeating && self.last.as_ref() == Some(sent) => Refusal::Wait,
            Verdict::React if !current => Refusal::UseNewer,
            Verdict::React => {
                self.answering_rejection = true;
                Refusal::RefreshNow
            }
        }
    }

    /// Tells whether the breaker holds rejections at `now`.
    pub fn breaker_open(&self, now: Instant) -> bool {
        self.breaker.is_open(now)
    }

    /// Notes that a token request is due at once, whatever the backoff: the client secret
    /// changed, or a reload may have mended what made the last one fail.
    pub fn ask_at_once(&mut self) {
        self.repeating = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn h(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    /// One thing that happens to an account's token, for the table.
    #[derive(Clone, Copy)]
    enum Event {
        Arrived(&'static str, u64),
        Failed(bool, &'static str, Option<u64>),
        /// An upstream refused this token, the cached one.
        Rejected(&'static str),
        SecretChanged,
    }

    #[derive(Debug, PartialEq)]
    enum Decision {
        Arrival(Arrival),
        Retry(Retry),
        Refusal(Refusal),
        RefreshNow,
    }

    use Event::*;

    /// Each row: a sentence of the protocol, the events in order (all at `t0`, with the
    /// middle of the jitter range), and the decision the last one leads to.
    #[test]
    fn the_decision_table() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + SECOND * secs as u32;
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let install = |next, recovered_after, cure| {
            Decision::Arrival(Arrival::Install {
                next,
                recovered_after,
                cure,
            })
        };
        let retry = |next, new_kind| Decision::Retry(Retry { next, new_kind });
        let rows: Vec<(&str, Vec<Event>, Decision)> = vec![
            (
                "a new token is installed and refreshed when its plan says",
                vec![Arrived("a", 2700)],
                install(at(2700), 0, false),
            ),
            (
                "a token after failures is installed and the failures are forgotten",
                vec![Failed(false, "timeout", None), Failed(false, "timeout", None), Arrived("a", 2700)],
                install(at(2700), 2, false),
            ),
            (
                "the same token again is not asked for at once: back off",
                vec![Arrived("a", 2700), Arrived("a", 2700)],
                Decision::Arrival(Arrival::BackOff { next: ms(250), first: true }),
            ),
            (
                "the same token a second time backs off further, and is warned about once",
                vec![Arrived("a", 2700), Arrived("a", 2700), Arrived("a", 2700)],
                Decision::Arrival(Arrival::BackOff { next: ms(500), first: false }),
            ),
            (
                "a transient failure is retried after the initial delay",
                vec![Failed(false, "connect", None)],
                retry(ms(250), true),
            ),
            (
                "transient failures back off exponentially, and a repeat is not news",
                vec![Failed(false, "connect", None); 3],
                retry(ms(1000), false),
            ),
            (
                "a different failure is news",
                vec![Failed(false, "connect", None), Failed(false, "timeout", None)],
                retry(ms(500), true),
            ),
            (
                "retries never wait past half of what a usable token has left",
                vec![Failed(false, "connect", None); 6]
                    .into_iter()
                    .chain([Failed(false, "connect", Some(4))])
                    .collect(),
                retry(at(2), false),
            ),
            (
                "a refusal only a new secret cures waits the slow cadence, however long the token lasts",
                vec![Failed(true, "refused", Some(4))],
                retry(at(60), true),
            ),
            (
                "an upstream's refusal of the current token asks for a new one now",
                vec![Arrived("a", 2700), Rejected("a")],
                Decision::Refusal(Refusal::RefreshNow),
            ),
            (
                "the token that answers a refusal is its cure",
                vec![Arrived("a", 2700), Rejected("a"), Arrived("b", 5400)],
                install(at(5400), 0, true),
            ),
            (
                "while the same token is repeated, its refusal passes through",
                vec![Arrived("a", 2700), Arrived("a", 2700), Rejected("a")],
                Decision::Refusal(Refusal::Wait),
            ),
            (
                "cures refused three times in a row open the breaker",
                vec![
                    Arrived("a", 2700),
                    Rejected("a"),
                    Arrived("b", 2700),
                    Rejected("b"),
                    Arrived("a", 2700),
                    Rejected("a"),
                    Arrived("b", 2700),
                    Rejected("b"),
                ],
                Decision::Refusal(Refusal::Hold { opened: true }),
            ),
            (
                "a new secret asks for a token now, even while backing off",
                vec![Arrived("a", 2700), Arrived("a", 2700), SecretChanged],
                Decision::RefreshNow,
            ),
            (
                "after a new secret, the repeated token is asked for again when refused",
                vec![Arrived("a", 2700), Arrived("a", 2700), SecretChanged, Rejected("a")],
                Decision::Refusal(Refusal::RefreshNow),
            ),
        ];
        for (sentence, events, expected) in rows {
            let mut life = Lifecycle::new(RetryPolicy::default(), BreakerPolicy::default());
            let mut last = None;
            for event in events {
                last = Some(match event {
                    Arrived(token, refresh) => {
                        Decision::Arrival(life.arrived(&h(token), at(refresh), t0, 0.5))
                    }
                    Failed(permanent, kind, left) => Decision::Retry(life.failed(
                        permanent,
                        kind,
                        left.map(|s| SECOND * s as u32),
                        t0,
                        0.5,
                    )),
                    Rejected(token) => Decision::Refusal(life.rejected(&h(token), true, t0)),
                    SecretChanged => {
                        life.ask_at_once();
                        Decision::RefreshNow
                    }
                });
            }
            assert_eq!(last, Some(expected), "{sentence}");
        }
    }

    #[test]
    fn a_refusal_of_a_token_already_replaced_uses_the_newer_one() {
        let t0 = Instant::now();
        let mut life = Lifecycle::new(RetryPolicy::default(), BreakerPolicy::default());
        life.arrived(&h("b"), t0, t0, 0.5);
        assert_eq!(life.rejected(&h("a"), false, t0), Refusal::UseNewer);
    }
}
