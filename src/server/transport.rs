//! A client's byte stream: plain TCP, TLS over it, or a Unix socket; and the listeners that
//! accept them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tokio_rustls::server::TlsStream;

/// A client connection's transport.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A listening socket bound in one thread and served in another: registered with the
/// serving thread's runtime only there ([`Bound::register`]).
#[derive(Debug)]
pub enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Bound {
    /// Registers the socket with the runtime of the calling thread.
    pub fn register(self) -> io::Result<Listener> {
        Ok(match self {
            Bound::Tcp(l) => Listener::Tcp(TcpListener::from_std(l)?),
            Bound::Unix(l) => Listener::Unix(UnixListener::from_std(l)?),
        })
    }

    /// The address of a TCP socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Unix(_) => None,
        }
    }
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
#[allow(unsafe_code)] // no safe API sets this option (std's is unstable, socket2 has none)
pub fn defer_accept(socket: &TcpSocket, seconds: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is a socket open for the length of the call, and the kernel
    // reads the option's value, a `c_int`, through a pointer and a length that describe it.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match set {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// `TCP_DEFER_ACCEPT` is Linux's: elsewhere a listener asked for it does not start.
#[cfg(not(target_os = "linux"))]
pub fn defer_accept(_socket: &TcpSocket, _seconds: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "server.defer_accept needs Linux's TCP_DEFER_ACCEPT",
    ))
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
                let (stream, peer) = l.accept().await?;
                // Inherited from the listening socket on Linux (`listen_socket`).
                #[cfg(not(target_os = "linux"))]
                let _ = stream.set_nodelay(true);
                Ok((Accepted::Tcp(stream), peer))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Accepted::Unix(stream), UNIX_PEER))
            }
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

    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let workers = crate::server::worker::bind(addr, 1, false).unwrap();
        let further = tcp_listener(addr).unwrap().into_std().unwrap();
        for listener in workers.into_iter().chain([further]) {
            let bound = listener.local_addr().unwrap();
            let listener = Listener::Tcp(TcpListener::from_std(listener).unwrap());
            let _client = TcpStream::connect(bound).await.unwrap();
            let (Accepted::Tcp(stream), _) = listener.accept().await.unwrap() else {
                panic!("a TCP listener accepted something else");
            };
            assert!(stream.nodelay().unwrap());
        }
    }
}
