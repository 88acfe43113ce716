//! An HTTP/2 connection's streams, polled by the connection's own task.
//!
//! hyper hands each stream's future to its executor. Spawned as a task of its own, each
//! request cost a task (its allocation, its place in the runtime's list, its ID) and a hop
//! between two tasks at each step: the stream's task, woken by the upstream's answer, woke
//! the connection's to write it. Here the executor leaves the future with the connection
//! that is being polled on this thread, which polls it beside hyper's connection.

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// Whether an HTTP/2 connection is being polled on this thread.
    static POLLING: Cell<bool> = const { Cell::new(false) };
    /// The futures hyper handed over meanwhile.
    static HANDED: RefCell<Vec<StreamFuture>> = const { RefCell::new(Vec::new()) };
}

/// hyper's executor for HTTP/2 connections: a future goes to the connection being polled
/// on this thread ([`Streams::poll_with`]); one handed over outside such a poll is spawned.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        if POLLING.get() {
            // A stream that panics (a bug) ends alone, as its own task would have.
            let contained = AssertUnwindSafe(future).catch_unwind().map(drop);
            HANDED.with_borrow_mut(|handed| handed.push(Box::pin(contained)));
        } else {
            tokio::spawn(future);
        }
    }
}

/// A connection's poll under way on this thread, until dropped: also when the poll
/// panics, when what was handed over and not yet taken goes with the connection.
struct Polling {
    was: bool,
}

impl Polling {
    fn begin() -> Polling {
        Polling {
            was: POLLING.replace(true),
        }
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        POLLING.set(self.was);
        if std::thread::panicking() {
            // Dropped outside the borrow: a future's drop may hand over another.
            drop(HANDED.with_borrow_mut(std::mem::take));
        }
    }
}

/// The streams of one HTTP/2 connection.
#[derive(Default)]
pub struct Streams {
    running: FuturesUnordered<StreamFuture>,
}

impl Streams {
    /// Polls the connection with `poll_connection`, and the streams: those running, then
    /// those it handed over. Ready, with the connection's outcome, once the connection is
    /// done and every stream has ended; `poll_connection` is not called again after it
    /// returned `Ready`.
    pub fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut poll_connection: impl FnMut(&mut Context<'_>) -> Poll<T>,
        done: &mut Option<T>,
    ) -> Poll<T> {
        let polling = Polling::begin();
        // Streams first: what they write is sent by the connection's poll.
        self.poll_streams(cx);
        if done.is_none() {
            if let Poll::Ready(outcome) = poll_connection(cx) {
                *done = Some(outcome);
            }
        }
        self.poll_streams(cx);
        drop(polling);
        if self.running.is_empty() {
            if let Some(outcome) = done.take() {
                return Poll::Ready(outcome);
            }
        }
        Poll::Pending
    }

    /// Polls the streams that can go on, and those handed over meanwhile, until none can.
    fn poll_streams(&mut self, cx: &mut Context<'_>) {
        loop {
            HANDED.with_borrow_mut(|handed| self.running.extend(handed.drain(..)));
            while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
            if HANDED.with_borrow(Vec::is_empty) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    /// A connection that hands over `streams` on its first poll and is done at once.
    fn handing_over(
        mut streams: Vec<StreamFuture>,
        polls: &mut usize,
    ) -> impl FnMut(&mut Context<'_>) -> Poll<&'static str> + '_ {
        move |_| {
            *polls += 1;
            for stream in streams.drain(..) {
                StreamExecutor.execute(stream);
            }
            Poll::Ready("done")
        }
    }

    /// A stream that ends once `open` is sent, and then says so in `ended`.
    fn gated() -> (oneshot::Sender<()>, Arc<AtomicBool>, StreamFuture) {
        let (open, gate) = oneshot::channel::<()>();
        let ended = Arc::new(AtomicBool::new(false));
        let stream = {
            let ended = ended.clone();
            Box::pin(async move {
                gate.await.unwrap();
                ended.store(true, Ordering::SeqCst);
            })
        };
        (open, ended, stream)
    }

    #[tokio::test]
    async fn a_connection_is_done_only_once_the_streams_it_handed_over_have_ended() {
        let (open, ended, stream) = gated();
        let mut streams = Streams::default();
        let mut done = None;
        let mut polls = 0;
        let mut connection = handing_over(vec![stream], &mut polls);
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(streams.poll_with(cx, &mut connection, &mut done))
        })
        .await;
        assert!(first.is_pending(), "a stream is still running");
        assert_eq!(streams.running.len(), 1);
        open.send(()).unwrap();
        let outcome = std::future::poll_fn(|cx| streams.poll_with(cx, &mut connection, &mut done));
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), outcome)
            .await
            .expect("the stream's end wakes the connection");
        assert_eq!(outcome, "done");
        assert!(ended.load(Ordering::SeqCst));
        drop(connection);
        assert_eq!(polls, 1, "a connection that is done is not polled again");
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let (open, ended, other) = gated();
        let panicking = Box::pin(async { panic!("a bug in a stream") }) as StreamFuture;
        let mut streams = Streams::default();
        let mut done = None;
        let mut polls = 0;
        let mut connection = handing_over(vec![panicking, other], &mut polls);
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(streams.poll_with(cx, &mut connection, &mut done))
        })
        .await;
        assert!(first.is_pending());
        assert_eq!(streams.running.len(), 1, "the panicking stream has ended");
        open.send(()).unwrap();
        let outcome = std::future::poll_fn(|cx| streams.poll_with(cx, &mut connection, &mut done));
        assert_eq!(outcome.await, "done");
        assert!(ended.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_connection_whose_poll_panics_leaves_nothing_behind_on_its_thread() {
        let mut streams = Streams::default();
        let mut done: Option<()> = None;
        let panicked = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            let _ = streams.poll_with(
                &mut cx,
                |_| {
                    StreamExecutor.execute(async {});
                    panic!("a bug in the connection")
                },
                &mut done,
            );
        }));
        assert!(panicked.is_err());
        assert!(!POLLING.get(), "no connection is being polled");
        assert!(
            HANDED.with_borrow(Vec::is_empty),
            "nothing left for another"
        );
    }

    #[tokio::test]
    async fn a_future_handed_over_outside_a_connections_poll_runs_as_a_task() {
        let (tx, rx) = oneshot::channel();
        StreamExecutor.execute(async move {
            tx.send("ran").unwrap();
        });
        assert!(HANDED.with_borrow(Vec::is_empty), "nothing left waiting");
        let ran = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        assert_eq!(ran.unwrap().unwrap(), "ran");
    }
}
