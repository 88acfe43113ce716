//! The client socket as hyper sees it, able to end an HTTP/2 connection with a GOAWAY of the
//! proxy's choosing. hyper sends GOAWAY only with `NO_ERROR`; to tell an abusive client to
//! `ENHANCE_YOUR_CALM` (RFC 9113 §7), this wrapper follows the frame boundaries of what hyper
//! writes and, when asked, puts its own GOAWAY at the next boundary and ends the connection.
//! HTTP/1 connections pass through untouched. Over TLS it sits inside the encryption, where
//! the frames are.
//!
//! The same following tells which HTTP a client speaks: [`ClientSocket::poll_protocol`] reads
//! what the client sends first (one read, as large as the request head usually is) and keeps
//! it for hyper's first read, so a new connection costs one read before its request is parsed.

use super::transport::Transport;
use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
/// RFC 9113 §7: the peer may be generating excessive load.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The most a connection's first read takes: a request head, or the preface and the
/// frames after it, as one read usually brings them.
const FIRST_READ: usize = 4096;

/// Which HTTP a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Http1,
    /// With prior knowledge: the connection began with the HTTP/2 preface.
    Http2,
}

/// What a connection's driver and its socket tell each other: the driver asks for GOAWAY
/// `ENHANCE_YOUR_CALM`; the service says that a request's body is to come; the socket counts
/// the HTTP/1 reads that bring bytes, which tell the watchdog that a request head has begun
/// on an idle connection.
#[derive(Debug, Default)]
pub struct SocketSignals {
    calm: AtomicBool,
    body_to_come: AtomicBool,
    /// A request's body was waited for: acknowledge before the next read.
    ack_now: AtomicBool,
    /// The socket's reader while a body may be waited for, woken to acknowledge.
    reader: AtomicWaker,
    http1_reads: AtomicU64,
}

impl SocketSignals {
    /// Asks for the GOAWAY; it goes out with hyper's next write.
    pub fn flip(&self) {
        self.calm.store(true, Ordering::Release);
    }

    fn is_on(&self) -> bool {
        self.calm.load(Ordering::Acquire)
    }

    /// Says that a request's body is still to come: until its answer is written on HTTP/1,
    /// from then on on HTTP/2, whose streams share the socket.
    pub fn body_to_come(&self) {
        self.body_to_come.store(true, Ordering::Relaxed);
    }

    /// Says that a request's body was waited for: it had not all come with its head. A
    /// client with Nagle's algorithm on holds a small body back until its head is
    /// acknowledged, which Linux delays (by up to 40 ms) on a connection that has had an
    /// exchange; so the socket acknowledges at once ([`Transport::ack_at_once`]) before
    /// its next read, and its reader is woken for that read. A body that came with its head
    /// is never waited for and costs no system call.
    pub fn body_late(&self) {
        self.ack_now.store(true, Ordering::Relaxed);
        self.reader.wake();
    }

    /// Whether the next read acknowledges first.
    #[cfg(test)]
    pub fn acknowledges_next_read(&self) -> bool {
        self.ack_now.load(Ordering::Relaxed)
    }

    fn take_ack_now(&self) -> bool {
        self.ack_now.load(Ordering::Relaxed) && self.ack_now.swap(false, Ordering::Relaxed)
    }

    /// An HTTP/1 answer is being written: its request's body came, or is no longer awaited.
    fn answering(&self) {
        if self.body_to_come.load(Ordering::Relaxed) {
            self.body_to_come.store(false, Ordering::Relaxed);
            self.ack_now.store(false, Ordering::Relaxed);
        }
    }

    /// The reads on an HTTP/1 connection that brought bytes, so far.
    pub fn http1_reads(&self) -> u64 {
        self.http1_reads.load(Ordering::Relaxed)
    }

    fn note_http1_read(&self) {
        self.http1_reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// Follows a stream of HTTP/2 frames: where each ends, and each frame header.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; FRAME_HEADER],
    have: usize,
    payload_left: usize,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Follows `data`, calling `on_header` with each complete frame header.
    fn feed(&mut self, mut data: &[u8], mut on_header: impl FnMut(&[u8; FRAME_HEADER])) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                let h = &self.header;
                self.payload_left =
                    usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                on_header(&self.header);
            }
        }
    }
}

#[derive(Debug)]
enum Protocol {
    /// Too few bytes read yet to tell.
    Unknown {
        seen: usize,
    },
    Http1,
    Http2 {
        incoming: Frames,
        outgoing: Frames,
        last_stream: u32,
        /// Bytes of the proxy's GOAWAY still to write.
        goaway: Option<(Vec<u8>, usize)>,
    },
    /// The GOAWAY went out: the connection is over.
    Ended,
}

/// A client socket that can end an HTTP/2 connection with GOAWAY `ENHANCE_YOUR_CALM`.
pub struct ClientSocket {
    stream: Transport,
    signals: Arc<SocketSignals>,
    protocol: Protocol,
    /// What [`ClientSocket::poll_protocol`] read and hyper has not yet.
    head: Bytes,
}

impl ClientSocket {
    /// Wraps `stream`; flipping `signals` ends it with a GOAWAY if it speaks HTTP/2.
    pub fn new(stream: Transport, signals: Arc<SocketSignals>) -> ClientSocket {
        ClientSocket {
            stream,
            signals,
            protocol: Protocol::Unknown { seen: 0 },
            head: Bytes::new(),
        }
    }

    /// Reads until it is clear which HTTP the client speaks, keeping what it read for the
    /// reads that follow; `None`: the client closed the connection before sending anything.
    pub fn poll_protocol(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Speaks>>> {
        loop {
            match self.protocol {
                Protocol::Unknown { .. } => {}
                Protocol::Http1 => return Poll::Ready(Ok(Some(Speaks::Http1))),
                Protocol::Http2 { .. } | Protocol::Ended => {
                    return Poll::Ready(Ok(Some(Speaks::Http2)))
                }
            }
            // On the stack: only what was read is kept.
            let mut space = [MaybeUninit::<u8>::uninit(); FIRST_READ];
            let mut buf = ReadBuf::uninit(&mut space);
            std::task::ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
            let read = buf.filled();
            if read.is_empty() {
                // A part of the preface and no more: hyper's HTTP/1 answers what it makes of it.
                return Poll::Ready(Ok((!self.head.is_empty()).then_some(Speaks::Http1)));
            }
            self.saw_incoming(read);
            if matches!(self.protocol, Protocol::Http1) {
                self.signals.note_http1_read();
            }
            self.head = if self.head.is_empty() {
                Bytes::copy_from_slice(read)
            } else {
                [&self.head[..], read].concat().into()
            };
        }
    }

    fn saw_incoming(&mut self, data: &[u8]) {
        let mut data = data;
        if let Protocol::Unknown { seen } = &mut self.protocol {
            let n = (PREFACE.len() - *seen).min(data.len());
            if data[..n] != PREFACE[*seen..*seen + n] {
                self.protocol = Protocol::Http1;
                return;
            }
            *seen += n;
            data = &data[n..];
            if *seen == PREFACE.len() {
                self.protocol = Protocol::Http2 {
                    incoming: Frames::default(),
                    outgoing: Frames::default(),
                    last_stream: 0,
                    goaway: None,
                };
            }
        }
        if let Protocol::Http2 {
            incoming,
            last_stream,
            ..
        } = &mut self.protocol
        {
            incoming.feed(data, |h| {
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                if h[3] == HEADERS && stream % 2 == 1 {
                    *last_stream = (*last_stream).max(stream);
                }
            });
        }
    }

    /// Writes the proxy's GOAWAY if it is asked for and hyper is between frames; returns
    /// `Ready` once the connection is over (hyper's writes then fail).
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Protocol::Http2 {
            outgoing,
            last_stream,
            goaway,
            ..
        } = &mut self.protocol
        else {
            return match self.protocol {
                Protocol::Ended => Poll::Ready(Ok(())),
                _ => Poll::Pending,
            };
        };
        if goaway.is_none() {
            if !self.signals.is_on() || !outgoing.at_boundary() {
                return Poll::Pending;
            }
            let mut frame = vec![0, 0, 8, GOAWAY, 0, 0, 0, 0, 0];
            frame.extend_from_slice(&last_stream.to_be_bytes());
            frame.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
            *goaway = Some((frame, 0));
        }
        let (frame, sent) = goaway.as_mut().expect("made above");
        while *sent < frame.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &frame[*sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.protocol = Protocol::Ended;
        Poll::Ready(Ok(()))
    }

    fn saw_outgoing(&mut self, written: usize, bufs: &[io::IoSlice<'_>]) {
        if let Protocol::Http2 { outgoing, .. } = &mut self.protocol {
            let mut left = written;
            for buf in bufs {
                let n = left.min(buf.len());
                outgoing.feed(&buf[..n], |_| {});
                left -= n;
                if left == 0 {
                    break;
                }
            }
        }
    }

    fn ended() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the connection was ended with GOAWAY ENHANCE_YOUR_CALM",
        )
    }

    fn write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.poll_goaway(cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(Err(Self::ended())),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending
                if matches!(
                    &self.protocol,
                    Protocol::Http2 {
                        goaway: Some(_),
                        ..
                    }
                ) =>
            {
                return Poll::Pending
            }
            Poll::Pending => {}
        }
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.saw_outgoing(n, bufs);
        }
        written
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            // Seen already, by `poll_protocol`.
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        if this.signals.take_ack_now() {
            this.stream.ack_at_once();
        }
        let http1 = matches!(this.protocol, Protocol::Http1);
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) if !http1 => this.saw_incoming(&buf.filled()[before..]),
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.signals.note_http1_read(),
            // A body may be waited for (HTTP/1: one is to come; HTTP/2: a stream's has been).
            Poll::Pending if this.signals.body_to_come.load(Ordering::Relaxed) => {
                this.signals.reader.register(cx.waker());
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.protocol, Protocol::Http1) {
            this.signals.answering();
            return Pin::new(&mut this.stream).poll_write(cx, buf);
        }
        this.write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if matches!(this.protocol, Protocol::Http1) {
            this.signals.answering();
            return Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        }
        this.write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(result) = this.poll_goaway(cx) {
            return Poll::Ready(result.and(Err(Self::ended())));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A client connection and the proxy's socket for it.
    async fn connected() -> (TcpStream, ClientSocket) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let socket = ClientSocket::new(Transport::Plain(accepted), Arc::default());
        (client, socket)
    }

    async fn protocol(socket: &mut ClientSocket) -> Option<Speaks> {
        std::future::poll_fn(|cx| socket.poll_protocol(cx))
            .await
            .unwrap()
    }

    /// What the socket gives its reader once the client has closed.
    async fn read_all(socket: &mut ClientSocket) -> Vec<u8> {
        let mut read = Vec::new();
        socket.read_to_end(&mut read).await.unwrap();
        read
    }

    #[tokio::test]
    async fn the_first_bytes_tell_the_protocol_and_are_read_again() {
        let mut h2 = PREFACE.to_vec();
        h2.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let big = [
            b"GET / HTTP/1.1\r\nX: ".to_vec(),
            vec![b'a'; 3 * FIRST_READ],
        ]
        .concat();
        let cases = [
            (head, Speaks::Http1),
            (b"POST".to_vec(), Speaks::Http1),
            (b"PRI * HTTP/1.1\r\n\r\n".to_vec(), Speaks::Http1),
            (h2, Speaks::Http2),
            (big, Speaks::Http1),
        ];
        for (sent, speaks) in cases {
            let (mut client, mut socket) = connected().await;
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            assert_eq!(protocol(&mut socket).await, Some(speaks), "{sent:?}");
            assert_eq!(read_all(&mut socket).await, sent);
        }
    }

    #[tokio::test]
    async fn a_preface_cut_short_is_waited_for() {
        let (mut client, mut socket) = connected().await;
        client.write_all(&PREFACE[..10]).await.unwrap();
        let early = std::future::poll_fn(|cx| socket.poll_protocol(cx));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), early).await;
        assert!(waited.is_err(), "decided on {:?}", &PREFACE[..10]);
        client.write_all(&PREFACE[10..]).await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(protocol(&mut socket).await, Some(Speaks::Http2));
        assert_eq!(read_all(&mut socket).await, PREFACE);
    }

    #[tokio::test]
    async fn a_client_that_closes_at_once_or_mid_preface_is_told_apart() {
        let (client, mut socket) = connected().await;
        drop(client);
        assert_eq!(protocol(&mut socket).await, None);

        let (mut client, mut socket) = connected().await;
        client.write_all(&PREFACE[..3]).await.unwrap();
        client.shutdown().await.unwrap();
        // hyper's HTTP/1 answers the fragment.
        assert_eq!(protocol(&mut socket).await, Some(Speaks::Http1));
        assert_eq!(read_all(&mut socket).await, &PREFACE[..3]);
    }

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frame_boundaries_are_followed_however_the_bytes_are_cut() {
        let mut stream = frame(0x4, 0, &[0; 6]);
        stream.extend(frame(HEADERS, 3, &[1; 40]));
        stream.extend(frame(0x0, 3, &vec![2; 70_000 % 16_384]));
        stream.extend(frame(HEADERS, 7, &[]));
        for cut in [1, 2, 5, 9, 10, 100, stream.len()] {
            let mut frames = Frames::default();
            let mut headers = Vec::new();
            for chunk in stream.chunks(cut) {
                frames.feed(chunk, |h| {
                    headers.push((h[3], u32::from_be_bytes([h[5], h[6], h[7], h[8]])))
                });
            }
            assert!(frames.at_boundary(), "cut {cut}");
            assert_eq!(
                headers,
                [(0x4, 0), (HEADERS, 3), (0x0, 3), (HEADERS, 7)],
                "cut {cut}"
            );
        }
        let mut frames = Frames::default();
        frames.feed(&stream[..12], |_| {});
        assert!(!frames.at_boundary());
    }

    /// Whether the connection acknowledges at once (Linux reads `TCP_QUICKACK` back so).
    #[cfg(target_os = "linux")]
    fn acks_at_once(socket: &ClientSocket) -> bool {
        let Transport::Plain(tcp) = &socket.stream else {
            panic!("the test's socket is plain TCP");
        };
        socket2::SockRef::from(tcp).tcp_quickack().unwrap()
    }

    /// Makes Linux delay the socket's acknowledgements, as it does again once a keep-alive
    /// connection has had an exchange.
    #[cfg(target_os = "linux")]
    fn delay_acks(socket: &ClientSocket) {
        let Transport::Plain(tcp) = &socket.stream else {
            unreachable!("plain TCP");
        };
        socket2::SockRef::from(tcp).set_tcp_quickack(false).unwrap();
    }

    /// A waker that counts how often it was woken.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls one read: how many bytes it gave, or `None` if it found nothing.
    fn read_once(socket: &mut ClientSocket, waker: &std::task::Waker) -> Option<usize> {
        let mut room = [0; 64];
        let mut buf = ReadBuf::new(&mut room);
        let mut cx = Context::from_waker(waker);
        match Pin::new(socket).poll_read(&mut cx, &mut buf) {
            Poll::Ready(read) => {
                read.unwrap();
                Some(buf.filled().len())
            }
            Poll::Pending => None,
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn each_request_body_waited_for_is_acknowledged_at_once() {
        use crate::server::transport::Accepted;
        let addr = "127.0.0.1:0".parse().unwrap();
        let (bound, mut sockets) = crate::server::worker::bind(addr, 1, false, false).unwrap();
        let listener = sockets.remove(0).register().unwrap();
        let mut client = TcpStream::connect(bound).await.unwrap();
        let (Accepted::Tcp(accepted), _) = listener.accept().await.unwrap() else {
            panic!("a TCP listener accepted something else");
        };
        let signals = Arc::new(SocketSignals::default());
        let mut socket = ClientSocket::new(Transport::Plain(accepted), signals.clone());
        let counting = Arc::new(Counting::default());
        let waker = std::task::Waker::from(counting.clone());
        let wakes = || counting.0.load(Ordering::SeqCst);
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n";
        client.write_all(head).await.unwrap();
        assert_eq!(protocol(&mut socket).await, Some(Speaks::Http1));
        socket.read_exact(&mut vec![0; head.len()]).await.unwrap();

        for request in 1..=2 {
            delay_acks(&socket);
            signals.body_to_come();
            // Reads that find nothing leave the acknowledgement to the answer...
            assert_eq!(read_once(&mut socket, &waker), None);
            assert!(!acks_at_once(&socket), "request {request}");
            // ...until the body is waited for: the reader is woken, and acknowledges first.
            signals.body_late();
            assert_eq!(wakes(), request, "the reader is woken");
            assert_eq!(read_once(&mut socket, &waker), None);
            assert!(acks_at_once(&socket), "request {request}");
            client.write_all(b"xy").await.unwrap();
            socket.read_exact(&mut [0; 2]).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        }
        // A request without a body: reads that find nothing neither wait for one nor
        // acknowledge.
        delay_acks(&socket);
        assert_eq!(read_once(&mut socket, &waker), None);
        assert!(!acks_at_once(&socket));
    }

    #[test]
    fn an_answer_ends_what_its_request_left_waiting() {
        let signals = SocketSignals::default();
        signals.body_to_come();
        signals.body_late();
        signals.answering();
        assert!(!signals.body_to_come.load(Ordering::Relaxed));
        assert!(
            !signals.take_ack_now(),
            "nothing to acknowledge after the answer"
        );
    }
}
