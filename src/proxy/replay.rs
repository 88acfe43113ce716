//! What is kept of a request so that it can be sent once more with a fresh token: after the
//! upstream refused the token it carried, or closed a reused connection under it.
//!
//! Almost every kept request is never sent again, so keeping is made cheap and sending again
//! pays: the head's fields are copied into one buffer of bytes, and a header map is made
//! from it only for a replay. A `HeaderMap` clone made two allocations and took a reference
//! on every value, and undid all of it when the request ended: about 1,000 instructions per
//! request on the keep-alive path. The forwarding headers are not kept either: they are
//! made again, the same, from the connection's client and the `Host` the client asked for.

use super::body::RequestBody;
use super::headers::ClientAddress;
use crate::config::ForwardingHeaders;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use tokio::sync::SemaphorePermit;

/// A request kept for a replay.
pub(super) struct Replay<'a> {
    method: Method,
    uri: Uri,
    /// The head as it was before the forwarding headers were set.
    headers: KeptHeaders,
    /// The `Host` the client asked for, for `X-Forwarded-Host`.
    forwarded_host: Option<HeaderValue>,
    body: Bytes,
    /// Its share of `server.replay_memory`, given back with it (none for an empty body).
    _budget: Option<SemaphorePermit<'a>>,
}

impl<'a> Replay<'a> {
    /// Keeps the head of a request that has no body: `parts` before the forwarding headers
    /// are set, and the `Host` the client asked for.
    pub(super) fn bodiless(
        parts: &http::request::Parts,
        forwarded_host: Option<HeaderValue>,
    ) -> Replay<'a> {
        Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: KeptHeaders::new(&parts.headers),
            forwarded_host,
            body: Bytes::new(),
            _budget: None,
        }
    }

    /// Keeps the head of a request (as [`Replay::bodiless`] does) and its body `body`, which
    /// holds `budget`.
    pub(super) fn with_body(
        parts: &http::request::Parts,
        forwarded_host: Option<HeaderValue>,
        body: Bytes,
        budget: SemaphorePermit<'a>,
    ) -> Replay<'a> {
        Replay {
            body,
            _budget: Some(budget),
            ..Replay::bodiless(parts, forwarded_host)
        }
    }

    /// Whether the request may be sent again after a failure before its answer (RFC 9110
    /// §9.2.2).
    pub(super) fn is_idempotent(&self) -> bool {
        self.method.is_idempotent()
    }

    /// Makes the request again, carrying `token`, with the forwarding headers in `set` made
    /// for `client` as for the first sending; `None` if its kept head cannot be read back,
    /// which a head this module wrote never gives.
    pub(super) fn request(
        &self,
        token: HeaderValue,
        client: &ClientAddress,
        set: ForwardingHeaders,
    ) -> Option<Request<RequestBody>> {
        let mut headers = self.headers.to_map(set.len() + 1)?;
        client.set_forwarding_headers(&mut headers, self.forwarded_host.clone(), set);
        headers.insert(header::AUTHORIZATION, token);
        let mut request = Request::new(RequestBody::Full(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = headers;
        Some(request)
    }
}

/// Header fields kept as one buffer: for each, in the map's order (a name's further values
/// after its first), the name's length, the value's length (native `usize` bytes), whether
/// the value is sensitive (one byte), the name and the value.
pub struct KeptHeaders {
    bytes: Vec<u8>,
    fields: usize,
}

const LEN: usize = std::mem::size_of::<usize>();
/// The bytes of a field besides its name and value.
const FRAME: usize = 2 * LEN + 1;

impl KeptHeaders {
    /// Copies the fields of `headers`.
    pub fn new(headers: &HeaderMap) -> KeptHeaders {
        // One pass: the room is a guess that fits most heads; a larger one grows the buffer.
        let mut bytes = Vec::with_capacity(headers.len() * (FRAME + 40));
        for (name, value) in headers {
            let (name, sensitive, value) = (
                name.as_str().as_bytes(),
                value.is_sensitive(),
                value.as_bytes(),
            );
            let mut frame = [0; FRAME];
            frame[..LEN].copy_from_slice(&name.len().to_ne_bytes());
            frame[LEN..2 * LEN].copy_from_slice(&value.len().to_ne_bytes());
            frame[2 * LEN] = u8::from(sensitive);
            bytes.reserve(FRAME + name.len() + value.len());
            bytes.extend_from_slice(&frame);
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(value);
        }
        KeptHeaders {
            bytes,
            fields: headers.len(),
        }
    }

    /// Makes the header map again, with room for `more` fields besides.
    pub fn to_map(&self, more: usize) -> Option<HeaderMap> {
        let mut map = HeaderMap::with_capacity(self.fields + more);
        let mut rest = &self.bytes[..];
        while !rest.is_empty() {
            let (frame, tail) = rest.split_at_checked(FRAME)?;
            let name_len = usize::from_ne_bytes(frame[..LEN].try_into().ok()?);
            let value_len = usize::from_ne_bytes(frame[LEN..2 * LEN].try_into().ok()?);
            let (name, tail) = tail.split_at_checked(name_len)?;
            let (value, tail) = tail.split_at_checked(value_len)?;
            let mut value = HeaderValue::from_bytes(value).ok()?;
            value.set_sensitive(frame[2 * LEN] != 0);
            map.append(HeaderName::from_bytes(name).ok()?, value);
            rest = tail;
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(map: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        map.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect()
    }

    #[test]
    fn a_kept_map_comes_back_the_same_in_the_same_order() {
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_static("media.example"));
        map.append("x-trace", HeaderValue::from_static("one"));
        map.append(header::ACCEPT, HeaderValue::from_static("application/json"));
        map.append("x-trace", HeaderValue::from_static("two"));
        map.insert("x-empty", HeaderValue::from_static(""));
        // Bytes beyond ASCII (obs-text) and a tab, as a client may send them.
        map.insert("x-latin", HeaderValue::from_bytes(b"caf\xe9\tbar").unwrap());
        let mut secret = HeaderValue::from_static("Basic c2VjcmV0");
        secret.set_sensitive(true);
        map.insert(header::PROXY_AUTHORIZATION, secret);
        // A removal moves the last field into the gap: the order is the map's, not insertion's.
        map.remove(header::HOST);

        let kept = KeptHeaders::new(&map);
        let back = kept.to_map(1).unwrap();
        assert_eq!(fields(&back), fields(&map));
        assert_eq!(back.get_all("x-trace").iter().count(), 2);
        assert!(back
            .get(header::PROXY_AUTHORIZATION)
            .unwrap()
            .is_sensitive());
        assert!(!back.get(header::ACCEPT).unwrap().is_sensitive());
        assert!(back.capacity() > back.len(), "room for the token");
    }

    #[test]
    fn an_empty_map_is_kept_without_bytes() {
        let kept = KeptHeaders::new(&HeaderMap::new());
        assert!(kept.bytes.is_empty());
        assert!(kept.to_map(0).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_buffer_gives_none_rather_than_a_wrong_map() {
        let mut map = HeaderMap::new();
        map.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
        let whole = KeptHeaders::new(&map);
        for cut in 1..whole.bytes.len() {
            let cut = KeptHeaders {
                bytes: whole.bytes[..cut].to_vec(),
                fields: 1,
            };
            assert!(
                cut.to_map(0).is_none(),
                "cut at {cut_len}",
                cut_len = cut.bytes.len()
            );
        }
    }
}
