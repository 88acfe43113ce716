//! What an account has been through, for metrics and the status page: counters written with
//! relaxed atomics, and a short timeline of the rare events (refreshes, rejections, replays).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Events kept per account for the status page's timeline.
pub const TIMELINE_LENGTH: usize = 32;

/// How a token request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOutcome {
    Ok,
    /// Retried with backoff: a timeout, a 5xx, a broken reply.
    Transient,
    /// Only a new secret or configuration cures it.
    Permanent,
}

impl TokenOutcome {
    pub const ALL: [TokenOutcome; 3] = [
        TokenOutcome::Ok,
        TokenOutcome::Transient,
        TokenOutcome::Permanent,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            TokenOutcome::Ok => "ok",
            TokenOutcome::Transient => "transient",
            TokenOutcome::Permanent => "permanent",
        }
    }
}

/// What became of a request whose token an upstream refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Replayed with a fresh token, and the upstream took it.
    Ok,
    /// Replayed, and the fresh token was refused too (the breaker counts it).
    Rejected,
    /// Not replayable (its body was streamed, or its route has `replay = false`).
    NotKept,
    /// The breaker was open: the refusal went to the client.
    Held,
    /// No fresh token came within `server.token_wait`.
    NoToken,
}

impl ReplayOutcome {
    pub const ALL: [ReplayOutcome; 5] = [
        ReplayOutcome::Ok,
        ReplayOutcome::Rejected,
        ReplayOutcome::NotKept,
        ReplayOutcome::Held,
        ReplayOutcome::NoToken,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ReplayOutcome::Ok => "ok",
            ReplayOutcome::Rejected => "rejected",
            ReplayOutcome::NotKept => "not_kept",
            ReplayOutcome::Held => "held",
            ReplayOutcome::NoToken => "no_token",
        }
    }
}

/// One entry of the timeline.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `refresh`, `refresh_failed`, `rejection` or `replay`.
    pub kind: &'static str,
    /// A short detail: a fingerprint, an error kind, a rejection code, a replay outcome.
    pub detail: String,
}

/// The counters and timeline of one account.
#[derive(Debug, Default)]
pub struct AccountStats {
    token_requests: [AtomicU64; 3],
    /// Milliseconds since the Unix epoch of the last token obtained; 0: none yet.
    last_refresh_ms: AtomicU64,
    rejections: Mutex<BTreeMap<String, u64>>,
    replays: [AtomicU64; 5],
    timeline: Mutex<VecDeque<Event>>,
}

impl AccountStats {
    pub(super) fn token_request(&self, outcome: TokenOutcome, detail: &str) {
        self.token_requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let kind = match outcome {
            TokenOutcome::Ok => {
                self.last_refresh_ms.store(now_ms(), Ordering::Relaxed);
                "refresh"
            }
            _ => "refresh_failed",
        };
        self.record(kind, detail);
    }

    /// Counts an upstream's refusal of a token, by its code.
    pub fn rejection(&self, code: &str) {
        *lock(&self.rejections).entry(code.to_owned()).or_default() += 1;
        self.record("rejection", code);
    }

    /// Counts what became of a refused request.
    pub fn replay(&self, outcome: ReplayOutcome) {
        self.replays[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.record("replay", outcome.label());
    }

    fn record(&self, kind: &'static str, detail: &str) {
        let mut timeline = lock(&self.timeline);
        if timeline.len() == TIMELINE_LENGTH {
            timeline.pop_front();
        }
        timeline.push_back(Event {
            at_ms: now_ms(),
            kind,
            detail: detail.to_owned(),
        });
    }

    /// Returns the number of token requests that ended with `outcome`.
    pub fn token_requests(&self, outcome: TokenOutcome) -> u64 {
        self.token_requests[outcome as usize].load(Ordering::Relaxed)
    }

    /// Returns when the last token was obtained, in milliseconds since the Unix epoch.
    pub fn last_refresh_ms(&self) -> Option<u64> {
        Some(self.last_refresh_ms.load(Ordering::Relaxed)).filter(|ms| *ms != 0)
    }

    /// Returns the refusals counted so far, by code.
    pub fn rejections(&self) -> Vec<(String, u64)> {
        lock(&self.rejections)
            .iter()
            .map(|(code, n)| (code.clone(), *n))
            .collect()
    }

    /// Returns the number of refused requests that ended with `outcome`.
    pub fn replays(&self, outcome: ReplayOutcome) -> u64 {
        self.replays[outcome as usize].load(Ordering::Relaxed)
    }

    /// Returns the timeline, oldest first.
    pub fn timeline(&self) -> Vec<Event> {
        lock(&self.timeline).iter().cloned().collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the Unix epoch by the wall clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_keeps_the_latest_events() {
        let stats = AccountStats::default();
        for _ in 0..TIMELINE_LENGTH + 5 {
            stats.replay(ReplayOutcome::Ok);
        }
        stats.rejection("ACCESS_TOKEN_EXPIRED");
        assert_eq!(stats.timeline().len(), TIMELINE_LENGTH);
        assert_eq!(stats.timeline().last().unwrap().kind, "rejection");
        assert_eq!(stats.replays(ReplayOutcome::Ok), TIMELINE_LENGTH as u64 + 5);
        assert_eq!(stats.rejections(), vec![("ACCESS_TOKEN_EXPIRED".into(), 1)]);
    }
}
