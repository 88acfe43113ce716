//! One shutdown signal, watched by every task; dropping the trigger counts as a shutdown.
//!
//! A flag and a [`Notify`] rather than a `watch` channel: every client connection holds a
//! signal and waits on it, and a clone is one reference count where a `watch` receiver's is
//! two, and a look at the flag takes no lock where `watch` reads its value under one.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use tokio::sync::Notify;

/// What the trigger and every signal share.
#[derive(Debug, Default)]
struct Shared {
    stopped: AtomicBool,
    notify: Notify,
}

impl Shared {
    fn stop(&self) {
        if !self.stopped.swap(true, SeqCst) {
            self.notify.notify_waiters();
        }
    }
}

/// The sending side: call [`ShutdownTrigger::trigger`] once to stop everything. When the
/// last clone is dropped, shutdown is signalled too.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger(Arc<Stopper>);

/// Signals shutdown when dropped: the last trigger going is a shutdown.
#[derive(Debug)]
struct Stopper(Arc<Shared>);

impl Drop for Stopper {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The watching side, cloned into every task.
#[derive(Clone, Debug)]
pub struct Shutdown(Arc<Shared>);

/// Creates a linked trigger and signal.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let shared = Arc::new(Shared::default());
    (
        ShutdownTrigger(Arc::new(Stopper(shared.clone()))),
        Shutdown(shared),
    )
}

impl ShutdownTrigger {
    /// Signals every watcher to stop.
    pub fn trigger(&self) {
        self.0 .0.stop();
    }
}

impl Shutdown {
    /// Resolves once shutdown has been signalled (or the trigger is gone).
    pub async fn wait(&self) {
        // Made before the flag is read: a stop in between still completes it.
        let notified = self.0.notify.notified();
        if self.0.stopped.load(SeqCst) {
            return;
        }
        notified.await;
    }
}

/// Creates a linked trigger and signal that SIGINT (Ctrl-C) or SIGTERM also triggers.
pub fn channel_on_signal() -> (ShutdownTrigger, Shutdown) {
    let (trigger, signal) = channel();
    tokio::spawn(trigger_on_signal(trigger.clone()));
    (trigger, signal)
}

/// Triggers shutdown on SIGINT (Ctrl-C) or SIGTERM.
pub async fn trigger_on_signal(trigger: ShutdownTrigger) {
    wait_for_signal().await;
    // First: shutdown must not hang on a log line.
    trigger.trigger();
    tracing::info!("shutting down");
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::pin::pin;

    #[test]
    fn a_wait_that_began_before_the_trigger_ends_with_it() {
        let (trigger, signal) = channel();
        let mut waiting = pin!(signal.wait());
        assert!(waiting.as_mut().now_or_never().is_none());
        assert!(waiting.as_mut().now_or_never().is_none(), "still waiting");
        trigger.trigger();
        assert!(waiting.now_or_never().is_some());
    }

    #[test]
    fn a_wait_after_the_trigger_ends_at_once_and_so_does_every_clone() {
        let (trigger, signal) = channel();
        let other = signal.clone();
        trigger.trigger();
        trigger.trigger();
        assert!(signal.wait().now_or_never().is_some());
        assert!(other.wait().now_or_never().is_some());
    }

    #[test]
    fn the_last_trigger_dropped_is_a_shutdown() {
        let (trigger, signal) = channel();
        let second = trigger.clone();
        let mut waiting = pin!(signal.wait());
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(trigger);
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "one trigger is left"
        );
        drop(second);
        assert!(waiting.now_or_never().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiting_task_on_every_thread_is_woken() {
        let (trigger, signal) = channel();
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let signal = signal.clone();
                tokio::spawn(async move { signal.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        trigger.trigger();
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(10), task)
                .await
                .expect("woken")
                .unwrap();
        }
    }
}
