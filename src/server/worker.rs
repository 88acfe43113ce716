//! Workers: the listeners that serve requests (the main one and the further ones) are
//! served by `server.workers` threads, each with a current-thread runtime of its own and
//! its own `SO_REUSEPORT` socket on each TCP address (a Unix socket is one socket every
//! worker accepts from), so the kernel spreads connections over them and a request never
//! leaves the thread that accepted it (no work stealing). The upstream connection pools are
//! shared, and keep each worker's idle connections apart ([`current`]).

use super::transport::{defer_accept, delay_first_ack, listen_socket, Bound, BACKLOG};
use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// How long a connection that sends nothing waits in the kernel before it is accepted all
/// the same (with `server.defer_accept`); `server.header_timeout` bounds it from then. One
/// second, as nginx's `deferred`.
const DEFER_ACCEPT_SECONDS: u32 = 1;

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Returns the index of the worker this thread is; `None` on any other thread (the control
/// thread, a test's runtime).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Marks this thread as worker `index`.
pub(crate) fn enter(index: usize) {
    INDEX.with(|cell| cell.set(Some(index)));
}

/// Binds `count` sockets to `addr` with `SO_REUSEPORT` (port 0: the port the first one
/// got), for the workers to serve, deferring each accept to the connection's first bytes
/// if `defer` (`server.defer_accept`), and with the first request acknowledged by its
/// answer unless `quickack` (`server.quickack`); they are registered with a runtime only in
/// their worker. Returns the address they are bound to, and the sockets. Called within a
/// runtime.
pub fn bind(
    addr: SocketAddr,
    count: usize,
    defer: bool,
    quickack: bool,
) -> std::io::Result<(SocketAddr, Vec<Bound>)> {
    let mut addr = addr;
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = listen_socket(addr)?;
        if defer {
            defer_accept(&socket, DEFER_ACCEPT_SECONDS)?;
        }
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    // Listening registers a socket with this runtime; into_std takes it back out.
    let sockets = sockets
        .into_iter()
        .map(|socket| {
            let socket = socket.listen(BACKLOG)?.into_std()?;
            if !quickack {
                delay_first_ack(&socket)?;
            }
            Ok(Bound::Tcp {
                socket,
                deferred: defer,
            })
        })
        .collect::<std::io::Result<_>>()?;
    Ok((addr, sockets))
}

/// Runs `serve(i, sockets)` for each worker's sockets on a thread of its own with a
/// current-thread runtime (`serve` is called within it, where the sockets can be
/// registered); resolves when every worker has returned, with the latest deadline one
/// returned.
pub async fn run<W, F, Fut>(workers: Vec<W>, serve: F) -> Instant
where
    W: Send + 'static,
    F: Fn(usize, W) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Instant> + 'static,
{
    let serve = Arc::new(serve);
    // The workers log where this thread logs (a test's scoped subscriber included).
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let mut done = Vec::new();
    for (i, sockets) in workers.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (serve, dispatch) = (serve.clone(), dispatch.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                enter(i);
                let _logging = tracing::dispatcher::set_default(&dispatch);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(worker = i, %error, "cannot start a worker's runtime");
                        return;
                    }
                };
                let deadline = runtime.block_on(async move { serve(i, sockets).await });
                let _ = tx.send(deadline);
            });
        match spawned {
            Ok(_) => done.push(rx),
            Err(error) => tracing::error!(worker = i, %error, "cannot start a worker thread"),
        }
    }
    let mut latest = Instant::now();
    for rx in done {
        if let Ok(deadline) = rx.await {
            latest = latest.max(deadline);
        }
    }
    latest
}
