//! Upgraded connections (WebSocket, for GraphQL subscriptions): the tunnel, and a passive
//! reader of the upstream's frames that notices a close with code 4403, Mosaic's way of
//! saying the token expired.

use super::body::ProxyBody;
use super::headers::remove_hop_by_hop;
use super::upstream::UpstreamBody;
use crate::identity::Account;
use crate::server::conn::ClientConn;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The close code a Mosaic service sends when the token of a subscription expired.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4403;

/// Returns the protocol a request asks to upgrade to (`Connection: upgrade` and one
/// `Upgrade` protocol), if it asks and `allowed` (lower-case names) holds it.
/// `Upgrade` is looked up first: most requests carry none, and need no second lookup.
pub fn requested(headers: &HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    let mut offered = headers.get_all(header::UPGRADE).iter();
    let protocol = offered.next().filter(|_| offered.next().is_none())?;
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let name = protocol.to_str().ok()?.trim();
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(name))
        .then(|| protocol.clone())
}

/// Puts back the two hop-by-hop headers an upgrade needs on the next hop.
pub fn keep_upgrade_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// What a tunnel needs besides its two ends.
pub struct TunnelParts {
    pub account: Arc<Account>,
    /// The token the upgrade request carried.
    pub sent: HeaderValue,
    /// The client connection, whose place under `max_connections` the tunnel keeps.
    pub conn: Arc<ClientConn>,
    /// The tunnel ends when no byte moves either way for this long.
    pub idle_timeout: Duration,
}

/// Answers the client with the upstream's answer; on `101 Switching Protocols` for the
/// protocol asked for, splices the two upgraded connections together in the background.
pub fn tunnel(
    mut response: Response<UpstreamBody>,
    client: OnUpgrade,
    asked: &HeaderValue,
    tunnel: TunnelParts,
) -> Response<ProxyBody> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upstream = switching.then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    remove_hop_by_hop(&mut parts.headers);
    let agreed = protocol.filter(|p| p.as_bytes().eq_ignore_ascii_case(asked.as_bytes()));
    match (upstream, agreed) {
        (Some(upstream), Some(protocol)) => {
            keep_upgrade_headers(&mut parts.headers, protocol);
            tokio::spawn(async move {
                match tokio::try_join!(client, upstream) {
                    Ok((client, upstream)) => {
                        splice(TokioIo::new(client), TokioIo::new(upstream), &tunnel).await
                    }
                    Err(error) => tracing::debug!(%error, "an upgrade did not complete"),
                }
            });
        }
        (Some(_), None) => {
            // A switch to something other than what was asked: nothing is tunnelled.
            tracing::warn!("the upstream switched to a protocol the client did not ask for");
            parts.status = StatusCode::BAD_GATEWAY;
            return Response::from_parts(parts, ProxyBody::full(""));
        }
        (None, _) => {}
    }
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

async fn splice(
    client: impl AsyncRead + AsyncWrite,
    upstream: impl AsyncRead + AsyncWrite,
    tunnel: &TunnelParts,
) {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    // Moves of bytes either way, so that an idle tunnel can be told from a busy one.
    let moved = AtomicU64::new(0);
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return upstream_write.shutdown().await;
            }
            moved.fetch_add(1, Relaxed);
            upstream_write.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut watcher = CloseWatcher::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = upstream_read.read(&mut buf).await?;
            if n == 0 {
                return client_write.shutdown().await;
            }
            moved.fetch_add(1, Relaxed);
            if watcher.feed(&buf[..n]) == Some(CLOSE_TOKEN_EXPIRED) {
                // The client will reconnect; make sure a fresh token awaits it.
                tunnel.account.reject(&tunnel.sent);
            }
            client_write.write_all(&buf[..n]).await?;
        }
    };
    let idle = async {
        let mut seen = None;
        loop {
            tokio::time::sleep(tunnel.idle_timeout).await;
            let now = moved.load(Relaxed);
            if seen == Some(now) {
                return;
            }
            seen = Some(now);
        }
    };
    // At shutdown a tunnel carries on for the grace period, then is closed both ways.
    let drained = async {
        tunnel.conn.draining.shutdown.wait().await;
        tokio::time::sleep(tunnel.conn.draining.grace).await;
    };
    let peer = tunnel.conn.peer();
    tokio::select! {
        result = up => if let Err(error) = result { tracing::debug!(%peer, %error, "upgraded connection ended") },
        result = down => if let Err(error) = result { tracing::debug!(%peer, %error, "upgraded connection ended") },
        () = idle => tracing::debug!(%peer, "upgraded connection closed: nothing moved for server.tunnel_idle_timeout"),
        () = drained => {
            tracing::debug!(%peer, "upgraded connection closed at the end of the shutdown grace period");
            let _ = tokio::join!(client_write.shutdown(), upstream_write.shutdown());
        }
    }
}

/// Reads WebSocket frames (RFC 6455 §5.2) as they pass and reports close codes.
#[derive(Debug, Default)]
pub struct CloseWatcher {
    header: [u8; 14],
    have: usize,
    payload: Option<Payload>,
}

#[derive(Debug)]
struct Payload {
    left: u64,
    close: bool,
    mask: Option<[u8; 4]>,
    offset: u64,
    code: [u8; 2],
}

impl CloseWatcher {
    /// Feeds the next bytes of the stream; returns the code of a close frame completed in them.
    pub fn feed(&mut self, mut data: &[u8]) -> Option<u16> {
        let mut found = None;
        while !data.is_empty() {
            match &mut self.payload {
                None => {
                    self.header[self.have] = data[0];
                    self.have += 1;
                    data = &data[1..];
                    if let Some((len, mask)) = parse_header(&self.header[..self.have]) {
                        self.have = 0;
                        let close = self.header[0] & 0x0f == 0x8;
                        if len > 0 {
                            self.payload = Some(Payload {
                                left: len,
                                close,
                                mask,
                                offset: 0,
                                code: [0; 2],
                            });
                        }
                    } else if self.have == self.header.len() {
                        self.have = 0; // Not a frame header: stop guessing, keep passing.
                    }
                }
                Some(p) => {
                    let n = (p.left.min(data.len() as u64)) as usize;
                    for (i, byte) in data[..n].iter().enumerate() {
                        let at = p.offset + i as u64;
                        if p.close && at < 2 {
                            let key = p.mask.map_or(0, |m| m[(at % 4) as usize]);
                            p.code[at as usize] = byte ^ key;
                        }
                    }
                    p.offset += n as u64;
                    p.left -= n as u64;
                    data = &data[n..];
                    if p.left == 0 {
                        if p.close && p.offset >= 2 {
                            found = Some(u16::from_be_bytes(p.code));
                        }
                        self.payload = None;
                    }
                }
            }
        }
        found
    }
}

/// Returns the payload length and mask of a complete frame header, `None` if more is needed.
fn parse_header(b: &[u8]) -> Option<(u64, Option<[u8; 4]>)> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let len7 = b[1] & 0x7f;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let total = 2 + ext + if masked { 4 } else { 0 };
    if b.len() < total {
        return None;
    }
    let len = match len7 {
        126 => u64::from(u16::from_be_bytes([b[2], b[3]])),
        127 => u64::from_be_bytes(b[2..10].try_into().ok()?),
        n => u64::from(n),
    };
    let mask = masked.then(|| {
        let m = &b[2 + ext..total];
        [m[0], m[1], m[2], m[3]]
    });
    Some((len, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(key) = mask {
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    #[test]
    fn a_close_4403_is_seen_whichever_way_the_stream_is_cut() {
        let mut stream = frame(0x1, b"hello", None);
        stream.extend(frame(0x2, &vec![7u8; 70_000], None));
        stream.extend(frame(0x1, &vec![1u8; 300], Some([1, 2, 3, 4])));
        stream.extend(frame(0x8, &[0x11, 0x33, b'b', b'y', b'e'], None));
        for cut in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut watcher = CloseWatcher::default();
            let codes: Vec<u16> = stream.chunks(cut).filter_map(|c| watcher.feed(c)).collect();
            assert_eq!(codes, [4403], "cut {cut}");
        }
    }

    #[test]
    fn masked_close_frames_and_other_codes_are_read() {
        let mut watcher = CloseWatcher::default();
        assert_eq!(
            watcher.feed(&frame(0x8, &1000u16.to_be_bytes(), Some([9, 8, 7, 6]))),
            Some(1000)
        );
        assert_eq!(watcher.feed(&frame(0x8, &[], None)), None);
        assert_eq!(watcher.feed(&frame(0x9, b"ping", None)), None);
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        let allowed = ["websocket".to_owned()];
        assert_eq!(requested(&h, &allowed).unwrap(), "WebSocket");
        assert!(requested(&h, &[]).is_none(), "no protocol allowed");
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(requested(&h, &allowed).is_none(), "h2c is not tunnelled");
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.append(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(
            requested(&h, &allowed).is_none(),
            "one protocol, not a choice"
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(requested(&h, &allowed).is_none(), "not asked in Connection");
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.remove(header::UPGRADE);
        assert!(requested(&h, &allowed).is_none(), "no protocol offered");
    }
}
