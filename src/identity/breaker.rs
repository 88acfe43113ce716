//! The rejection breaker: stops refreshing for rejections that a fresh token does not cure
//! (a permission problem, a misrouted request), so the proxy never loops on them.

use http::HeaderValue;
use std::time::Duration;
use tokio::time::Instant;

/// When the breaker opens and for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerPolicy {
    /// Fresh tokens refused in a row before the breaker opens.
    pub threshold: u32,
    /// How long an open breaker passes rejections through; also how long strikes are kept.
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            threshold: 3,
            cooldown: Duration::from_secs(60),
        }
    }
}

/// What to do about one rejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Refresh (and replay, if the request allows it).
    React,
    /// Pass the rejection through untouched; `opened` is true for the rejection that opened it.
    Hold { opened: bool },
}

/// The breaker of one account.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    strikes: u32,
    last_strike: Option<Instant>,
    open_until: Option<Instant>,
    /// The token obtained to cure the last rejection; its own rejection is a strike.
    cure: Option<HeaderValue>,
}

impl Breaker {
    /// Creates a closed breaker.
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            strikes: 0,
            last_strike: None,
            open_until: None,
            cure: None,
        }
    }

    /// Judges the rejection of the token `sent` at `now`.
    pub fn on_rejection(&mut self, sent: &HeaderValue, now: Instant) -> Verdict {
        if let Some(until) = self.open_until {
            if now < until {
                return Verdict::Hold { opened: false };
            }
            // Half-open: one more cure is tried; its failure opens the breaker again.
            self.open_until = None;
            self.strikes = self.policy.threshold.saturating_sub(1);
            self.last_strike = Some(now);
        }
        if self
            .last_strike
            .is_some_and(|at| now.saturating_duration_since(at) > self.policy.cooldown)
        {
            self.strikes = 0;
        }
        if self.cure.as_ref() == Some(sent) {
            // Counted once, however many requests carried the cure.
            self.cure = None;
            self.strikes += 1;
            self.last_strike = Some(now);
            if self.strikes >= self.policy.threshold {
                self.open_until = Some(now + self.policy.cooldown);
                return Verdict::Hold { opened: true };
            }
        }
        Verdict::React
    }

    /// Tells whether the breaker holds rejections at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|until| now < until)
    }

    /// Records the token obtained in answer to a rejection.
    pub fn on_cure(&mut self, header: HeaderValue) {
        self.cure = Some(header);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn stale_rejections_always_get_a_reaction() {
        let mut b = Breaker::new(BreakerPolicy::default());
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.on_rejection(&h("Bearer old"), now), Verdict::React);
        }
    }

    #[test]
    fn fresh_tokens_refused_in_a_row_open_the_breaker_for_the_cooldown() {
        let policy = BreakerPolicy::default();
        let mut b = Breaker::new(policy.clone());
        let t0 = Instant::now();
        assert_eq!(b.on_rejection(&h("Bearer a"), t0), Verdict::React);
        b.on_cure(h("Bearer b"));
        assert_eq!(b.on_rejection(&h("Bearer b"), t0), Verdict::React);
        // Other requests that carried the same cure do not count again.
        assert_eq!(b.on_rejection(&h("Bearer b"), t0), Verdict::React);
        b.on_cure(h("Bearer c"));
        assert_eq!(b.on_rejection(&h("Bearer c"), t0), Verdict::React);
        b.on_cure(h("Bearer d"));
        assert_eq!(
            b.on_rejection(&h("Bearer d"), t0),
            Verdict::Hold { opened: true }
        );
        assert_eq!(
            b.on_rejection(&h("Bearer d"), t0 + Duration::from_secs(1)),
            Verdict::Hold { opened: false }
        );
        // After the cooldown one more cure is tried, and its failure reopens at once.
        let later = t0 + policy.cooldown + Duration::from_secs(1);
        assert_eq!(b.on_rejection(&h("Bearer d"), later), Verdict::React);
        b.on_cure(h("Bearer e"));
        assert_eq!(
            b.on_rejection(&h("Bearer e"), later),
            Verdict::Hold { opened: true }
        );
    }

    #[test]
    fn strikes_are_forgotten_after_a_quiet_cooldown() {
        let policy = BreakerPolicy::default();
        let mut b = Breaker::new(policy.clone());
        let t0 = Instant::now();
        for (i, cure) in ["Bearer b", "Bearer c"].into_iter().enumerate() {
            b.on_cure(h(cure));
            assert_eq!(
                b.on_rejection(&h(cure), t0 + Duration::from_millis(i as u64)),
                Verdict::React
            );
        }
        let later = t0 + policy.cooldown * 2;
        b.on_cure(h("Bearer d"));
        assert_eq!(b.on_rejection(&h("Bearer d"), later), Verdict::React);
    }
}
