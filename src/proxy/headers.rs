//! Header and query rewriting between client and upstream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// proxy credentials of RFC 9110 §11.7, which are meant for this hop only.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including every header that `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// Appends `?query` to `out` without any `access_token` parameter (Mosaic answers 400 when a
/// token arrives in both the query and the header); nothing is appended if nothing is left.
pub fn push_query_without_access_token(out: &mut String, query: &str) {
    let mut first = true;
    for pair in query.split('&') {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        if name == "access_token" || pair.is_empty() {
            continue;
        }
        out.push(if first { '?' } else { '&' });
        out.push_str(pair);
        first = false;
    }
}

/// Returns `X-Forwarded-For` with `peer` appended to what earlier proxies wrote.
pub fn forwarded_for(existing: Option<&HeaderValue>, peer: IpAddr) -> HeaderValue {
    let text = match existing.and_then(|v| v.to_str().ok()) {
        Some(before) if !before.trim().is_empty() => format!("{before}, {peer}"),
        _ => peer.to_string(),
    };
    HeaderValue::try_from(text).expect("addresses and visible ASCII make a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn forwarded_for_appends_to_earlier_proxies() {
        let peer: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(forwarded_for(None, peer), "127.0.0.2");
        let before = HeaderValue::from_static("10.0.0.1");
        assert_eq!(forwarded_for(Some(&before), peer), "10.0.0.1, 127.0.0.2");
    }

    #[test]
    fn only_the_access_token_parameter_is_dropped() {
        let mut out = String::new();
        push_query_without_access_token(&mut out, "access_token_x=1&access_token=2");
        assert_eq!(out, "?access_token_x=1");
    }
}
