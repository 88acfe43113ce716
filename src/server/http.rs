//! HTTP/1.1 (with upgrades) and HTTP/2 with prior knowledge on one port: the connection
//! learns which from the client's first bytes ([`ClientSocket::poll_protocol`]), then hyper
//! serves it. hyper's first read gets the whole of that first read, where a sniff of the
//! preface's 24 bytes alone would cost a new connection a second read and hyper's buffer a
//! reallocation.

use super::goaway::{ClientSocket, Speaks};
use super::streams::{StreamExecutor, Streams};
use crate::config::ConnectionLimits;
use crate::BoxError;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// hyper's settings for either protocol, shared by a listener's connections.
pub struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<StreamExecutor>,
}

impl Protocols {
    pub fn new(limits: &ConnectionLimits) -> Protocols {
        let mut http1 = http1::Builder::new();
        // No `header_read_timeout`: hyper starts it as soon as a connection is idle, which
        // would close idle keep-alive connections at `header_timeout`, not `idle_timeout`,
        // and arms a timer for every request. The watchdog bounds request heads instead.
        http1
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .max_headers(limits.max_headers);
        let mut http2 = http2::Builder::new(StreamExecutor);
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .initial_stream_window_size(limits.h2_stream_window)
            .initial_connection_window_size(limits.h2_connection_window)
            .max_send_buf_size(limits.h2_stream_window as usize)
            .max_header_list_size(limits.max_header_bytes as u32);
        Protocols { http1, http2 }
    }
}

type Io = TokioIo<ClientSocket>;

/// A service a client connection is served with, as hyper's HTTP/1 and HTTP/2 connections
/// take it.
pub trait Served:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<Self::Body>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
    + Unpin
    + 'static
{
    /// The body of its answers.
    type Body: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> Served for S
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<B>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Send
        + Unpin
        + 'static,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type Body = B;
}

/// One client connection: its first read, then hyper's HTTP/1 or HTTP/2 connection.
pub struct Connection<S>
where
    S: HttpService<Incoming>,
{
    state: State<S>,
}

// The whole connection is boxed once, and most connections become HTTP/1 ones.
#[allow(clippy::large_enum_variant)]
enum State<S>
where
    S: HttpService<Incoming>,
{
    First {
        socket: ClientSocket,
        service: S,
        protocols: Arc<Protocols>,
    },
    Http1(http1::UpgradeableConnection<Io, S>),
    /// Boxed: twice the size of HTTP/1's, which is what most connections speak.
    Http2(Box<Http2<S>>),
    Over,
}

impl<S: Served> Connection<S> {
    /// Serves `socket` with `service` once its first bytes tell the protocol.
    pub fn new(protocols: Arc<Protocols>, socket: ClientSocket, service: S) -> Connection<S> {
        Connection {
            state: State::First {
                socket,
                service,
                protocols,
            },
        }
    }

    /// Lets the request in flight finish and closes (HTTP/2: GOAWAY, then the streams
    /// finish); before the first bytes, closes now.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            State::First { .. } => this.state = State::Over,
            State::Http1(conn) => Pin::new(conn).graceful_shutdown(),
            // Once hyper's connection has ended, only its last streams are left to finish.
            State::Http2(h2) if h2.done.is_none() => Pin::new(&mut h2.conn).graceful_shutdown(),
            State::Http2(_) => {}
            State::Over => {}
        }
    }
}

impl<S: Served> Future for Connection<S> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let speaks = match &mut this.state {
            State::First { socket, .. } => match std::task::ready!(socket.poll_protocol(cx)) {
                Ok(speaks) => speaks,
                Err(error) => {
                    this.state = State::Over;
                    return Poll::Ready(Err(error.into()));
                }
            },
            State::Http1(conn) => return Pin::new(conn).poll(cx).map_err(Into::into),
            State::Http2(h2) => return h2.poll(cx),
            State::Over => return Poll::Ready(Ok(())),
        };
        let State::First {
            socket,
            service,
            protocols,
        } = std::mem::replace(&mut this.state, State::Over)
        else {
            unreachable!("matched above");
        };
        let io = TokioIo::new(socket);
        this.state = match speaks {
            None => return Poll::Ready(Ok(())),
            Some(Speaks::Http1) => State::Http1(
                protocols
                    .http1
                    .serve_connection(io, service)
                    .with_upgrades(),
            ),
            Some(Speaks::Http2) => State::Http2(Box::new(Http2 {
                conn: protocols.http2.serve_connection(io, service),
                done: None,
                streams: Streams::default(),
            })),
        };
        Pin::new(this).poll(cx)
    }
}

/// hyper's HTTP/2 connection and its streams, polled by one task.
struct Http2<S>
where
    S: HttpService<Incoming>,
{
    conn: http2::Connection<Io, S, StreamExecutor>,
    /// How it ended, while its last streams finish.
    done: Option<Result<(), hyper::Error>>,
    streams: Streams,
}

impl<S: Served> Http2<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let conn = &mut self.conn;
        self.streams
            .poll_with(cx, |cx| Pin::new(&mut *conn).poll(cx), &mut self.done)
            .map_err(Into::into)
    }
}
