//! When a client connection has held on too long: a pure function of what the connection
//! reported, the limits and `now`, so that the timing is tested on paused time.

use std::time::Duration;
use tokio::time::Instant;

/// What a connection reports about itself (see [`super::conn::ConnState`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Requests received so far.
    pub requests: u64,
    /// Requests whose answer has not been handed over completely.
    pub in_flight: usize,
    /// Times the client side asked an answer for more (a count that moves while it reads).
    pub pulls: u64,
    /// Answers that handed out a piece and wait for the client side to take the next.
    pub awaiting_reader: usize,
    /// Reads that brought bytes on an HTTP/1 connection (never on HTTP/2) since it last
    /// had nothing in flight: the next request head has begun.
    pub reads_since_idle: u64,
    /// Whether the connection speaks HTTP/1 and has read something.
    pub http1: bool,
}

/// The time limits a connection is held to.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
    pub write: Duration,
}

/// Why a connection was ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No complete request head within the header timeout of the accept.
    NoRequest,
    /// A later HTTP/1 request head begun and not complete within the header timeout.
    SlowHead,
    /// No request in flight for the idle timeout.
    Idle,
    /// The client left an answer unread for the write timeout.
    NotReading,
}

impl Reason {
    /// Says the reason in words, for the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRequest => "no request head within server.header_timeout",
            Reason::SlowHead => {
                "a request head begun and not complete within server.header_timeout"
            }
            Reason::Idle => "idle for server.idle_timeout",
            Reason::NotReading => "the client read nothing for server.write_timeout",
        }
    }
}

/// What to do with a connection now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Look again at this instant (or earlier, if something happens).
    CheckAt(Instant),
    /// Close politely: nothing is in flight (HTTP/1 closes, HTTP/2 sends GOAWAY).
    Close(Reason),
    /// Drop the connection now, with whatever it holds.
    Drop(Reason),
}

/// A connection seen with nothing in flight.
#[derive(Clone, Copy, Debug)]
struct Idle {
    /// The request count it was first seen idle with, and when.
    requests: u64,
    since: Instant,
    /// When the bytes of a next request head were first seen.
    head_seen: Option<Instant>,
}

/// The watch over one connection.
#[derive(Debug)]
pub struct Watchdog {
    timeouts: Timeouts,
    accepted: Instant,
    /// Since when the connection has been idle, and what it had seen then.
    idle: Option<Idle>,
    /// The pull count and the instant an unread answer was first seen with it.
    stall: Option<(u64, Instant)>,
}

impl Watchdog {
    /// Starts watching a connection accepted at `accepted`.
    pub fn new(timeouts: Timeouts, accepted: Instant) -> Watchdog {
        Watchdog {
            timeouts,
            accepted,
            idle: None,
            stall: None,
        }
    }

    /// The first instant worth a look: until then a connection that has sent nothing yet is
    /// within its header timeout.
    pub fn first_check(&self) -> Instant {
        self.accepted + self.timeouts.header
    }

    /// Judges the connection as `seen` at `now`.
    pub fn check(&mut self, seen: Snapshot, now: Instant) -> Verdict {
        let t = self.timeouts;
        if seen.requests == 0 {
            let deadline = self.first_check();
            return if now >= deadline {
                Verdict::Drop(Reason::NoRequest)
            } else {
                Verdict::CheckAt(deadline)
            };
        }
        if seen.in_flight == 0 {
            self.stall = None;
            let idle = match &mut self.idle {
                // No request came and went since the connection was first seen idle.
                Some(idle) if idle.requests == seen.requests => idle,
                _ => self.idle.insert(Idle {
                    requests: seen.requests,
                    since: now,
                    head_seen: None,
                }),
            };
            if seen.reads_since_idle > 0 {
                // Bytes of a next request came in, and no request of them yet.
                let begun = *idle.head_seen.get_or_insert(now);
                return if now >= begun + t.header {
                    Verdict::Drop(Reason::SlowHead)
                } else {
                    Verdict::CheckAt(begun + t.header)
                };
            }
            let closes = idle.since + t.idle;
            return if now >= closes {
                Verdict::Close(Reason::Idle)
            } else if seen.http1 {
                // HTTP/1: looked at every header timeout meanwhile, to see a head begin; so
                // a later head has between one and two header timeouts from its first byte.
                Verdict::CheckAt(closes.min(now + t.header))
            } else {
                Verdict::CheckAt(closes)
            };
        }
        self.idle = None;
        // Busy: look again now and then, since an answer may stall without a wake-up, and
        // within a header timeout of the connection going idle.
        let tick = (t.write / 8).max(Duration::from_millis(10)).min(t.header);
        if seen.awaiting_reader == 0 {
            self.stall = None;
            return Verdict::CheckAt(now + tick);
        }
        match self.stall {
            // Nothing was pulled since the unread answer was first seen.
            Some((pulls, since)) if pulls == seen.pulls => {
                if now >= since + t.write {
                    Verdict::Drop(Reason::NotReading)
                } else {
                    Verdict::CheckAt(since + t.write)
                }
            }
            _ => {
                self.stall = Some((seen.pulls, now));
                Verdict::CheckAt(now + t.write)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        write: Duration::from_secs(80),
    };

    fn snap(requests: u64, in_flight: usize, pulls: u64, awaiting_reader: usize) -> Snapshot {
        Snapshot {
            requests,
            in_flight,
            pulls,
            awaiting_reader,
            reads_since_idle: 0,
            http1: false,
        }
    }

    /// An HTTP/1 connection with `reads` since it last went idle.
    fn http1(requests: u64, in_flight: usize, reads: u64) -> Snapshot {
        Snapshot {
            reads_since_idle: reads,
            http1: true,
            ..snap(requests, in_flight, requests, 0)
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_connection_that_sends_no_request_is_dropped_at_the_header_timeout_from_accept() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(w.first_check(), t0 + s(10));
        assert_eq!(w.check(snap(0, 0, 0, 0), t0), Verdict::CheckAt(t0 + s(10)));
        assert_eq!(
            w.check(snap(0, 0, 0, 0), t0 + s(9)),
            Verdict::CheckAt(t0 + s(10))
        );
        assert_eq!(
            w.check(snap(0, 0, 0, 0), t0 + s(10)),
            Verdict::Drop(Reason::NoRequest)
        );
    }

    #[test]
    fn an_idle_connection_is_closed_after_the_idle_timeout_and_a_new_request_restarts_it() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(
            w.check(snap(1, 0, 1, 0), t0 + s(1)),
            Verdict::CheckAt(t0 + s(61))
        );
        // A request came and went meanwhile: the idle time starts again.
        assert_eq!(
            w.check(snap(2, 0, 2, 0), t0 + s(61)),
            Verdict::CheckAt(t0 + s(121))
        );
        assert_eq!(
            w.check(snap(2, 0, 2, 0), t0 + s(121)),
            Verdict::Close(Reason::Idle)
        );
    }

    #[test]
    fn a_busy_connection_is_never_idle() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(w.check(snap(1, 1, 0, 0), t0), Verdict::CheckAt(t0 + s(10)));
        assert_eq!(
            w.check(snap(1, 1, 0, 0), t0 + s(500)),
            Verdict::CheckAt(t0 + s(510))
        );
    }

    #[test]
    fn an_answer_left_unread_for_the_write_timeout_drops_the_connection() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(w.check(snap(1, 1, 5, 1), t0), Verdict::CheckAt(t0 + s(80)));
        assert_eq!(
            w.check(snap(1, 1, 5, 1), t0 + s(79)),
            Verdict::CheckAt(t0 + s(80))
        );
        assert_eq!(
            w.check(snap(1, 1, 5, 1), t0 + s(80)),
            Verdict::Drop(Reason::NotReading)
        );
    }

    #[test]
    fn a_slow_reader_that_keeps_reading_is_kept() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(w.check(snap(1, 1, 5, 1), t0), Verdict::CheckAt(t0 + s(80)));
        assert_eq!(
            w.check(snap(1, 1, 6, 1), t0 + s(80)),
            Verdict::CheckAt(t0 + s(160))
        );
        // Waiting for the upstream, not for the client: not the client's fault.
        assert_eq!(
            w.check(snap(1, 1, 6, 0), t0 + s(160)),
            Verdict::CheckAt(t0 + s(170))
        );
    }

    #[test]
    fn an_idle_http1_connection_is_kept_for_the_idle_timeout_and_looked_at_meanwhile() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(w.check(http1(1, 0, 0), t0), Verdict::CheckAt(t0 + s(10)));
        assert_eq!(
            w.check(http1(1, 0, 0), t0 + s(10)),
            Verdict::CheckAt(t0 + s(20))
        );
        assert_eq!(
            w.check(http1(1, 0, 0), t0 + s(55)),
            Verdict::CheckAt(t0 + s(60))
        );
        assert_eq!(
            w.check(http1(1, 0, 0), t0 + s(60)),
            Verdict::Close(Reason::Idle)
        );
    }

    #[test]
    fn a_later_http1_head_has_the_header_timeout_from_when_it_is_seen() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(w.check(http1(1, 0, 0), t0), Verdict::CheckAt(t0 + s(10)));
        // The first byte of the next head came in meanwhile.
        assert_eq!(
            w.check(http1(1, 0, 1), t0 + s(10)),
            Verdict::CheckAt(t0 + s(20))
        );
        // More bytes, still no request: the clock does not start again.
        assert_eq!(
            w.check(http1(1, 0, 4), t0 + s(15)),
            Verdict::CheckAt(t0 + s(20))
        );
        assert_eq!(
            w.check(http1(1, 0, 5), t0 + s(20)),
            Verdict::Drop(Reason::SlowHead)
        );
    }

    #[test]
    fn a_later_head_that_completes_makes_a_request_and_the_wait_starts_again() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        assert_eq!(w.check(http1(1, 0, 0), t0), Verdict::CheckAt(t0 + s(10)));
        assert_eq!(
            w.check(http1(1, 0, 1), t0 + s(10)),
            Verdict::CheckAt(t0 + s(20))
        );
        // The head completed: a request, answered by the next look.
        assert_eq!(
            w.check(http1(2, 0, 0), t0 + s(19)),
            Verdict::CheckAt(t0 + s(29))
        );
        assert_eq!(
            w.check(http1(2, 0, 0), t0 + s(29)),
            Verdict::CheckAt(t0 + s(39))
        );
    }
}
