//! A connection's side signals (shutdown, a calm request, its watchdog's timer) polled only
//! when one of them woke the connection's task, not on every wake-up of the connection itself:
//! a request wakes the task several times, and a select over all four would poll the three
//! signals each time.

use futures_util::task::AtomicWaker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

/// The waker the side signals are polled with: it marks that one of them fired, then wakes
/// the task.
pub struct SideWaker {
    flag: Arc<Flag>,
    waker: Waker,
}

struct Flag {
    raised: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raised.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for SideWaker {
    /// Creates the waker, raised: the signals are polled at the first chance.
    fn default() -> SideWaker {
        let flag = Arc::new(Flag {
            raised: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        SideWaker {
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl SideWaker {
    /// Has the signals polled at the next chance (one was replaced, or another may have
    /// fired while the first was handled).
    pub fn raise(&self) {
        self.flag.raised.store(true, Ordering::Release);
    }

    /// Registers the task polled with `cx`; returns the context to poll the signals with if
    /// one of them woke it since they were last polled.
    pub fn woken(&self, cx: &Context<'_>) -> Option<Context<'_>> {
        // Registered before the mark is read: a signal firing in between wakes the task again.
        self.flag.task.register(cx.waker());
        self.flag
            .raised
            .swap(false, Ordering::AcqRel)
            .then(|| Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;

    #[tokio::test]
    async fn a_signal_is_polled_only_after_it_woke_the_task() {
        let side = SideWaker::default();
        let notify = tokio::sync::Notify::new();
        let mut notified = std::pin::pin!(notify.notified());
        let mut polls = 0;
        let mut step = |cx: &mut Context<'_>| match side.woken(cx) {
            Some(mut side_cx) => {
                polls += 1;
                notified.as_mut().poll(&mut side_cx)
            }
            None => Poll::Pending,
        };
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(step(&mut cx).is_pending(), "first poll registers");
        assert!(step(&mut cx).is_pending(), "nothing fired");
        notify.notify_one();
        assert!(step(&mut cx).is_ready());
        assert_eq!(polls, 2);
    }
}
