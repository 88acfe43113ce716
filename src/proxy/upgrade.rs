//! Upgraded connections (WebSocket, for GraphQL subscriptions): the tunnel, and a passive
//! reader of the upstream's frames that notices a close with code 4403, Mosaic's way of
//! saying the token expired.

use super::headers::remove_hop_by_hop;
use super::service::ProxyBody;
use crate::identity::Account;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The close code a Mosaic service sends when the token of a subscription expired.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4403;

/// Returns the protocol a request asks to upgrade to, if it asks (`Connection: upgrade`).
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Puts back the two hop-by-hop headers an upgrade needs on the next hop.
pub fn keep_upgrade_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Answers the client with the upstream's answer; on `101 Switching Protocols`, splices the
/// two upgraded connections together in the background.
pub fn tunnel(
    mut response: Response<Incoming>,
    client: OnUpgrade,
    account: Arc<Account>,
    sent: HeaderValue,
) -> Response<ProxyBody> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upstream = switching.then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    remove_hop_by_hop(&mut parts.headers);
    if let (Some(upstream), Some(protocol)) = (upstream, protocol) {
        keep_upgrade_headers(&mut parts.headers, protocol);
        tokio::spawn(async move {
            match tokio::try_join!(client, upstream) {
                Ok((client, upstream)) => {
                    splice(
                        TokioIo::new(client),
                        TokioIo::new(upstream),
                        &account,
                        &sent,
                    )
                    .await
                }
                Err(error) => tracing::debug!(%error, "an upgrade did not complete"),
            }
        });
    }
    Response::from_parts(parts, Either::Left(body))
}

async fn splice(
    client: impl AsyncRead + AsyncWrite,
    upstream: impl AsyncRead + AsyncWrite,
    account: &Account,
    sent: &HeaderValue,
) {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let up = tokio::io::copy(&mut client_read, &mut upstream_write);
    let down = async {
        let mut watcher = CloseWatcher::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = upstream_read.read(&mut buf).await?;
            if n == 0 {
                return client_write.shutdown().await;
            }
            if watcher.feed(&buf[..n]) == Some(CLOSE_TOKEN_EXPIRED) {
                // The client will reconnect; make sure a fresh token awaits it.
                account.reject(sent);
            }
            client_write.write_all(&buf[..n]).await?;
        }
    };
    tokio::select! {
        result = up => if let Err(error) = result { tracing::debug!(%error, "upgraded connection ended") },
        result = down => if let Err(error) = result { tracing::debug!(%error, "upgraded connection ended") },
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
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(requested(&h).unwrap(), "websocket");
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(requested(&h).is_none());
    }
}
