//! Deadline timers kept from one request to the next.
//!
//! A fresh `tokio::time::timeout` per request puts a timer in the runtime's wheel when the
//! request first waits and takes it out when the request ends: two operations under the
//! driver's lock for every request. A kept timer is set anew with a later deadline, which
//! tokio records in the timer alone; the wheel moves it only once its old deadline passes.
//! One accept loop's connections share its timers: they all run on its runtime, to which a
//! timer belongs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

/// The most timers kept: as many requests waiting at once take one each without making
/// it; more than that make their own, which end with them.
const KEPT: usize = 256;

/// The timers no request holds now.
#[derive(Debug, Default)]
pub struct KeptTimers(Mutex<Vec<Pin<Box<Sleep>>>>);

/// The deadline passed.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

impl KeptTimers {
    /// Runs `future` until `deadline`, on a kept timer if one is free.
    pub fn within<F: Future + Unpin>(&self, deadline: Instant, future: F) -> Within<'_, F> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let timer = match kept {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Within {
            kept: self,
            future,
            timer: Some(timer),
        }
    }
}

/// A future bounded by a deadline; its timer is kept again when it ends.
pub struct Within<'a, F> {
    kept: &'a KeptTimers,
    future: F,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F: Future + Unpin> Future for Within<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(output) = Pin::new(&mut self.future).poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let timer = self
            .timer
            .as_mut()
            .expect("the timer is taken only on drop");
        timer.as_mut().poll(cx).map(|()| Err(Elapsed))
    }
}

impl<F> Drop for Within<'_, F> {
    fn drop(&mut self) {
        let Some(timer) = self.timer.take() else {
            return;
        };
        let mut kept = self.kept.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT {
            kept.push(timer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_kept_timer_bounds_each_request_by_its_own_deadline() {
        let kept = KeptTimers::default();
        let now = Instant::now();
        let answered = kept.within(now + Duration::from_secs(1), std::future::ready(7));
        assert_eq!(answered.await, Ok(7));
        assert_eq!(kept.0.lock().unwrap().len(), 1);

        // The same timer, set anew: the later deadline holds, not the first one.
        let pending = std::future::pending::<()>();
        let waited = kept.within(now + Duration::from_secs(3), pending);
        assert_eq!(waited.await, Err(Elapsed));
        assert_eq!(Instant::now(), now + Duration::from_secs(3));

        // Two at once, each with a timer, each with its own deadline; both are kept.
        let start = Instant::now();
        let first = kept.within(start + Duration::from_secs(5), std::future::pending::<()>());
        let second = kept.within(start + Duration::from_secs(2), std::future::pending::<()>());
        let ended = |within| async move { (within.await, start.elapsed().as_secs()) };
        let (first, second) = tokio::join!(ended(first), ended(second));
        assert_eq!(first, (Err(Elapsed), 5));
        assert_eq!(second, (Err(Elapsed), 2));
        assert_eq!(kept.0.lock().unwrap().len(), 2);
    }
}
