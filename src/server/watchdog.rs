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

/// The watch over one connection.
#[derive(Debug)]
pub struct Watchdog {
    timeouts: Timeouts,
    accepted: Instant,
    /// The request count and the instant the connection was first seen idle with it.
    idle: Option<(u64, Instant)>,
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
            return match self.idle {
                // No request came and went since the connection was first seen idle.
                Some((requests, since)) if requests == seen.requests => {
                    if now >= since + t.idle {
                        Verdict::Close(Reason::Idle)
                    } else {
                        Verdict::CheckAt(since + t.idle)
                    }
                }
                _ => {
                    self.idle = Some((seen.requests, now));
                    Verdict::CheckAt(now + t.idle)
                }
            };
        }
        self.idle = None;
        // Busy: look again now and then, since an answer may stall without a wake-up.
        let tick = (t.write / 8).max(Duration::from_millis(10));
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
}
