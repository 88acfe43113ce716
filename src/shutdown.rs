//! One shutdown signal, watched by every task; dropping the trigger counts as a shutdown.

use std::sync::Arc;
use tokio::sync::watch;

/// The sending side: call [`ShutdownTrigger::trigger`] once to stop everything.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger(Arc<watch::Sender<bool>>);

/// The watching side, cloned into every task.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// Creates a linked trigger and signal.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(Arc::new(tx)), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Signals every watcher to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown has been signalled (or the trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
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
