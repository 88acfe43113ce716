//! A client's byte stream: plain TCP, TLS over it, or a Unix socket; and the listeners that
//! accept them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

/// A client connection's transport.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// A bound listener.
///
/// tokio's own `accept` takes a new connection for readable, so that the first read tries
/// the socket at once. A connection is accepted when its handshake completes, and a client
/// sends its request only then, so that read almost always finds nothing: one system call
/// per connection for nothing. The listeners of connections handed over at the handshake
/// therefore accept with mio and register the connection as it is: its first read waits
/// for the event of its first bytes. A socket with `TCP_DEFER_ACCEPT` hands a connection
/// over with its first bytes at hand, and there tokio's guess is right.
pub enum Listener {
    /// TCP, connections registered as they are: their first read waits for their first
    /// bytes.
    Tcp(AsyncFd<mio::net::TcpListener>),
    /// TCP, connections taken for readable (tokio's `accept`): for a socket with
    /// `server.defer_accept`, which hands them over with their first bytes, and for a
    /// listener given to [`serve`](super::serve) already registered (the admin listener).
    TcpReadAtOnce(TcpListener),
    Unix(AsyncFd<mio::net::UnixListener>),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::TcpReadAtOnce(listener)
    }
}

/// A listening socket bound in one thread and served in another: registered with the
/// serving thread's runtime only there ([`Bound::register`]).
#[derive(Debug)]
pub enum Bound {
    /// A TCP socket, `deferred` if it has `TCP_DEFER_ACCEPT` ([`defer_accept`]).
    Tcp {
        socket: std::net::TcpListener,
        deferred: bool,
    },
    Unix(std::os::unix::net::UnixListener),
}

impl Bound {
    /// Registers the socket with the runtime of the calling thread.
    pub fn register(self) -> io::Result<Listener> {
        Ok(match self {
            Bound::Tcp {
                socket,
                deferred: true,
            } => Listener::TcpReadAtOnce(TcpListener::from_std(socket)?),
            Bound::Tcp {
                socket,
                deferred: false,
            } => Listener::Tcp(register(mio::net::TcpListener::from_std(socket))?),
            Bound::Unix(l) => Listener::Unix(register(mio::net::UnixListener::from_std(l))?),
        })
    }

    /// The address of a TCP socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp { socket, .. } => socket.local_addr().ok(),
            Bound::Unix(_) => None,
        }
    }
}

/// Registers a listening socket with the runtime of the calling thread, for reading.
#[allow(unsafe_code)] // tokio's registration of a descriptor it does not own is unsafe
fn register<L: AsRawFd>(listener: L) -> io::Result<AsyncFd<L>> {
    // SAFETY: a mio listener owns its descriptor, open until the listener is dropped, and
    // `as_raw_fd` returns that one each time; the `AsyncFd` owns the listener.
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }.map_err(Into::into)
}

/// A connection just accepted.
pub enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The connections a listening socket queues before they are accepted.
pub const BACKLOG: u32 = 1024;

/// A socket for a TCP listener on `addr`, not yet bound: address reuse, and `TCP_NODELAY`,
/// which Linux hands on to every connection the listener accepts (a system call less per
/// connection than setting it on each).
pub fn listen_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Has the kernel hand over a listening socket's connections only once their first bytes
/// have arrived, or after about `seconds` without them (`TCP_DEFER_ACCEPT`; Linux only). A
/// client speaks first in every protocol the proxy serves, so a connection is then accepted
/// with its request at hand: no read that finds nothing, no wait for the next event. One
/// that connects and says nothing waits in the kernel, not in the proxy, until then.
#[cfg(target_os = "linux")]
pub fn defer_accept(socket: &TcpSocket, seconds: u32) -> io::Result<()> {
    let seconds = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    set_tcp_option(socket, libc::TCP_DEFER_ACCEPT, seconds)
}

/// `TCP_DEFER_ACCEPT` is Linux's: elsewhere a listener asked for it does not start.
#[cfg(not(target_os = "linux"))]
pub fn defer_accept(_socket: &TcpSocket, _seconds: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "server.defer_accept needs Linux's TCP_DEFER_ACCEPT",
    ))
}

/// Has a listening socket's connections acknowledge a request with the answer to it rather
/// than with a packet of their own (`TCP_QUICKACK` off, which Linux hands on to every
/// connection the listener accepts; `listen` clears it, so it is set after). A new
/// connection otherwise acknowledges its client's first request at once: one packet more
/// per connection for the proxy to send and for the client to take in. Should the answer
/// take longer than the delayed-acknowledgement timer (40 ms), the kernel acknowledges
/// then; a request whose body is waited for is acknowledged at once
/// ([`Transport::ack_at_once`]).
/// Linux only: elsewhere the kernel's own behaviour stays.
pub fn delay_first_ack(listener: &impl AsRawFd) -> io::Result<()> {
    set_quickack(listener, false)
}

/// `TCP_QUICKACK`, Linux's: elsewhere nothing is changed.
#[cfg(target_os = "linux")]
fn set_quickack(socket: &impl AsRawFd, on: bool) -> io::Result<()> {
    set_tcp_option(socket, libc::TCP_QUICKACK, libc::c_int::from(on))
}

#[cfg(not(target_os = "linux"))]
fn set_quickack(_socket: &impl AsRawFd, _on: bool) -> io::Result<()> {
    Ok(())
}

/// Sets a TCP socket option that takes an integer: one unsafe call for both options, as
/// socket2 has no `TCP_DEFER_ACCEPT` and std's options are unstable or for streams only.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_tcp_option(
    socket: &impl AsRawFd,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the descriptor is a socket open for the length of the call, and the kernel
    // reads the option's value, a `c_int`, through a pointer and a length that describe it.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match set {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// A TCP listener on `addr` (no `SO_REUSEPORT`: the admin and further listeners).
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = listen_socket(addr)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Clients on a Unix socket are on this machine: they count as loopback.
pub const UNIX_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

impl Listener {
    /// Accepts the next connection and names its peer.
    pub async fn accept(&self) -> io::Result<(Accepted, SocketAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l
                    .async_io(Interest::READABLE, mio::net::TcpListener::accept)
                    .await?;
                let stream = TcpStream::from_std(OwnedFd::from(stream).into())?;
                Ok((Accepted::Tcp(nodelay(stream)), peer))
            }
            Listener::TcpReadAtOnce(l) => {
                let (stream, peer) = l.accept().await?;
                Ok((Accepted::Tcp(nodelay(stream)), peer))
            }
            Listener::Unix(l) => {
                let (stream, _) = l
                    .async_io(Interest::READABLE, mio::net::UnixListener::accept)
                    .await?;
                let stream = UnixStream::from_std(OwnedFd::from(stream).into())?;
                Ok((Accepted::Unix(stream), UNIX_PEER))
            }
        }
    }
}

/// Sets `TCP_NODELAY` where the listening socket does not hand it on (`listen_socket`).
fn nodelay(stream: TcpStream) -> TcpStream {
    #[cfg(not(target_os = "linux"))]
    let _ = stream.set_nodelay(true);
    stream
}

impl Transport {
    /// Has the connection acknowledge what it received at once, and what it receives from
    /// now on as Linux does for a new connection. A request whose body is still to come may
    /// have a client that holds the body back until its head is acknowledged (Nagle's
    /// algorithm, a head and a small body written apart); with the first acknowledgement
    /// left to the answer ([`delay_first_ack`]) it would wait for the kernel's timer.
    pub fn ack_at_once(&self) {
        let tcp = match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => tls.get_ref().0,
            Transport::Unix(_) => return,
        };
        if let Err(error) = set_quickack(tcp, true) {
            tracing::debug!(%error, "cannot have a client connection acknowledge at once");
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Transport::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
            Transport::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (_, workers) = crate::server::worker::bind(addr, 1, false, false).unwrap();
        let further = Bound::Tcp {
            socket: tcp_listener(addr).unwrap().into_std().unwrap(),
            deferred: false,
        };
        for socket in workers.into_iter().chain([further]) {
            let bound = socket.local_addr().unwrap();
            let listener = socket.register().unwrap();
            let _client = TcpStream::connect(bound).await.unwrap();
            let (Accepted::Tcp(stream), _) = listener.accept().await.unwrap() else {
                panic!("a TCP listener accepted something else");
            };
            assert!(stream.nodelay().unwrap());
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_acknowledge_with_the_answer_unless_quickack() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for (defer, quickack) in [(false, false), (false, true), (true, false), (true, true)] {
            let (bound, mut workers) =
                crate::server::worker::bind(addr, 1, defer, quickack).unwrap();
            let listener = workers.remove(0).register().unwrap();
            let mut client = TcpStream::connect(bound).await.unwrap();
            // A deferred listener hands a connection over with its first bytes.
            client.write_all(b"G").await.unwrap();
            let (Accepted::Tcp(stream), _) = listener.accept().await.unwrap() else {
                panic!("a TCP listener accepted something else");
            };
            // Linux reads `TCP_QUICKACK` back as "not delaying acknowledgements".
            let acks_at_once = socket2::SockRef::from(&stream).tcp_quickack().unwrap();
            assert_eq!(
                acks_at_once, quickack,
                "defer_accept {defer}, quickack {quickack}"
            );
        }
    }

    /// Whether a connection's first read would try the socket now (`read_ready`, its
    /// readiness), its client having sent nothing yet.
    async fn reads_at_once(
        mut read_ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
    ) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(read_ready(cx).is_ready())).await
    }

    /// Reads three bytes, which must come within seconds.
    async fn read_three(stream: &mut (impl AsyncRead + Unpin)) -> [u8; 3] {
        let mut got = [0; 3];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got));
        read.await.expect("the bytes were read").unwrap();
        got
    }

    /// Checks that a connection's first read `waits` (its client sent nothing yet), and
    /// that the client's first bytes then wake it.
    async fn first_bytes_wake_the_reader(
        waits: bool,
        stream: &mut (impl AsyncRead + Unpin),
        client: &mut (impl AsyncWrite + Unpin),
    ) {
        assert!(waits, "read before any bytes came");
        client.write_all(b"GET").await.unwrap();
        assert_eq!(&read_three(stream).await, b"GET");
    }

    #[tokio::test]
    async fn a_connection_is_read_once_its_first_bytes_arrive() {
        let socket = tcp_listener("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .into_std()
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = Bound::Tcp {
            socket,
            deferred: false,
        };
        let listener = listener.register().unwrap();

        let mut client = TcpStream::connect(addr).await.unwrap();
        let (Accepted::Tcp(mut stream), _) = listener.accept().await.unwrap() else {
            panic!("a TCP listener accepted something else");
        };
        let waits = !reads_at_once(|cx| stream.poll_read_ready(cx)).await;
        first_bytes_wake_the_reader(waits, &mut stream, &mut client).await;

        // Bytes that came before the accept are read as well.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"PUT").await.unwrap();
        let (Accepted::Tcp(mut stream), _) = listener.accept().await.unwrap() else {
            panic!("a TCP listener accepted something else");
        };
        assert_eq!(&read_three(&mut stream).await, b"PUT");

        // A listener handed over already registered reads at once (tokio's `accept`).
        let listener = Listener::from(tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap());
        let Listener::TcpReadAtOnce(ref tokio_listener) = listener else {
            panic!("a registered listener became another kind");
        };
        let _client = TcpStream::connect(tokio_listener.local_addr().unwrap()).await;
        let (Accepted::Tcp(stream), _) = listener.accept().await.unwrap() else {
            panic!("a TCP listener accepted something else");
        };
        assert!(reads_at_once(|cx| stream.poll_read_ready(cx)).await);
    }

    #[tokio::test]
    async fn a_unix_socket_connection_is_read_once_its_first_bytes_arrive() {
        let dir = std::env::temp_dir().join(format!("transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.sock");
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener = Bound::Unix(socket).register().unwrap();

        let mut client = UnixStream::connect(&path).await.unwrap();
        let (Accepted::Unix(mut stream), peer) = listener.accept().await.unwrap() else {
            panic!("a Unix listener accepted something else");
        };
        assert_eq!(peer, UNIX_PEER);
        let waits = !reads_at_once(|cx| stream.poll_read_ready(cx)).await;
        first_bytes_wake_the_reader(waits, &mut stream, &mut client).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
