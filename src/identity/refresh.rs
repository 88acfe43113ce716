//! When to refresh a token and how long to wait after a failure: pure functions.

use std::time::Duration;

/// When a token is refreshed and how long it may be injected.
#[derive(Clone, Debug, PartialEq)]
pub struct RefreshPolicy {
    /// Refresh at this fraction of the lifetime (0.75: after 45 minutes of an hour).
    pub fraction: f64,
    /// Refresh no later than this before `exp`, when the lifetime leaves room for it.
    pub refresh_margin: Duration,
    /// Never inject a token this close to `exp` (capped at a tenth of the lifetime).
    pub expiry_margin: Duration,
    /// Refresh up to this fraction of the lifetime earlier, at random, so replicas spread out.
    pub jitter: f64,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            fraction: 0.75,
            refresh_margin: Duration::from_secs(60),
            expiry_margin: Duration::from_secs(15),
            jitter: 0.05,
        }
    }
}

/// How long to wait before the next token request after a failure.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// The first delay after a transient failure; it doubles with each further failure.
    pub initial: Duration,
    /// The cap of the transient delay.
    pub max: Duration,
    /// The delay after a failure that only a new secret or account can cure.
    pub permanent: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            permanent: Duration::from_secs(60),
        }
    }
}

/// The schedule of one token, relative to the moment its request was sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// When to ask for the next token.
    pub refresh_after: Duration,
    /// How long the token may be injected.
    pub usable_for: Duration,
}

/// Plans a token of `lifetime`; `sample` is a random number in `[0, 1)` for the jitter.
pub fn plan(lifetime: Duration, policy: &RefreshPolicy, sample: f64) -> Plan {
    let margin = policy.expiry_margin.min(lifetime / 10);
    let usable_for = lifetime.saturating_sub(margin);
    let by_fraction = lifetime.mul_f64(policy.fraction);
    let by_margin = lifetime.saturating_sub(policy.refresh_margin);
    // A margin larger than the lifetime allows would refresh in a loop: never before half-life.
    let target = by_fraction.min(by_margin).max(lifetime / 2);
    let jitter = lifetime.mul_f64(policy.jitter * sample.clamp(0.0, 1.0));
    Plan {
        refresh_after: target.saturating_sub(jitter).min(usable_for),
        usable_for,
    }
}

/// The delay before try number `failures + 1`; `sample` is a random number in `[0, 1)`.
///
/// Transient failures back off exponentially with full jitter, floored at half the initial
/// delay so that a run of unlucky samples cannot hammer the service.
pub fn retry_delay(policy: &RetryPolicy, permanent: bool, failures: u32, sample: f64) -> Duration {
    let sample = sample.clamp(0.0, 1.0);
    if permanent {
        return policy.permanent.mul_f64(0.9 + 0.2 * sample);
    }
    let exponent = failures.saturating_sub(1).min(30);
    let ceiling = policy
        .initial
        .saturating_mul(1u32 << exponent)
        .min(policy.max);
    ceiling
        .mul_f64(sample)
        .max(policy.initial / 2)
        .min(policy.max)
}

/// Shortens a transient retry delay while a token is still usable for `remaining`: never
/// more than half of what is left, so the tries speed up as the expiry nears instead of
/// sleeping past it; never less than half the initial delay.
pub fn before_expiry(
    delay: Duration,
    remaining: Option<Duration>,
    policy: &RetryPolicy,
) -> Duration {
    match remaining {
        Some(left) if !left.is_zero() => delay.min(left / 2).max(policy.initial / 2),
        _ => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn an_hour_token_is_refreshed_at_three_quarters() {
        let p = plan(HOUR, &RefreshPolicy::default(), 0.0);
        assert_eq!(p.refresh_after, Duration::from_secs(2700));
        assert_eq!(p.usable_for, Duration::from_secs(3585));
    }

    #[test]
    fn jitter_only_moves_the_refresh_earlier() {
        let policy = RefreshPolicy::default();
        let early = plan(HOUR, &policy, 0.999);
        assert!(early.refresh_after < Duration::from_secs(2700));
        assert!(early.refresh_after >= Duration::from_secs(2700 - 180));
    }

    #[test]
    fn the_refresh_margin_wins_when_it_is_earlier_than_the_fraction() {
        let policy = RefreshPolicy {
            fraction: 0.9,
            refresh_margin: Duration::from_secs(600),
            ..RefreshPolicy::default()
        };
        let p = plan(HOUR, &policy, 0.0);
        assert_eq!(p.refresh_after, Duration::from_secs(3000));
    }

    #[test]
    fn short_tokens_are_never_refreshed_before_half_life_and_stay_usable_most_of_it() {
        let p = plan(Duration::from_secs(2), &RefreshPolicy::default(), 0.0);
        assert_eq!(p.refresh_after, Duration::from_secs(1));
        assert_eq!(p.usable_for, Duration::from_millis(1800));
    }

    #[test]
    fn the_refresh_always_comes_before_the_token_becomes_unusable() {
        for secs in [1u64, 2, 30, 59, 60, 61, 600, 3600, 86400] {
            for sample in [0.0, 0.5, 0.99] {
                let lifetime = Duration::from_secs(secs);
                let p = plan(lifetime, &RefreshPolicy::default(), sample);
                assert!(p.refresh_after <= p.usable_for, "{secs}s {sample}");
                assert!(p.usable_for < lifetime);
            }
        }
    }

    #[test]
    fn transient_delays_grow_up_to_the_cap() {
        let policy = RetryPolicy::default();
        assert_eq!(
            retry_delay(&policy, false, 1, 1.0),
            Duration::from_millis(500)
        );
        assert!(retry_delay(&policy, false, 3, 0.999_999) > Duration::from_millis(1900));
        assert_eq!(
            retry_delay(&policy, false, 40, 1.0),
            Duration::from_secs(30)
        );
        assert_eq!(
            retry_delay(&policy, false, 5, 0.0),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn retries_speed_up_as_the_token_nears_its_end() {
        let policy = RetryPolicy::default();
        let thirty = Duration::from_secs(30);
        assert_eq!(before_expiry(thirty, None, &policy), thirty);
        assert_eq!(
            before_expiry(thirty, Some(Duration::from_secs(10)), &policy),
            Duration::from_secs(5)
        );
        assert_eq!(
            before_expiry(thirty, Some(Duration::from_millis(100)), &policy),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn permanent_failures_wait_the_slow_cadence() {
        let policy = RetryPolicy::default();
        let d = retry_delay(&policy, true, 1, 0.5);
        assert_eq!(d, Duration::from_secs(60));
    }
}
