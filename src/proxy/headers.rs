//! Header and query rewriting between client and upstream.

use crate::config::ForwardingHeaders;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use std::net::IpAddr;

/// `Keep-Alive`: how long the sender keeps an idle connection (`timeout=5`), hop-by-hop.
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// proxy credentials and challenges of RFC 9110 §11.7, which are meant for this hop only.
/// `Connection` comes first: the names it lists go too.
const HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    KEEP_ALIVE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];
const HOP_COUNT: usize = 9;

/// Removes hop-by-hop headers, including every header that `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of a lookup of each, and
    // then only those present are removed.
    let mut present = [false; HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // `Connection` first (index 0): the names it lists are removed by reference to its
    // values, taken out of the map (a clone of each is a reference count). Most values name
    // no header (`close`, which a client that opens a connection per request sends with
    // each, or `keep-alive`), and those are not kept: no allocation, no lookup. (Not
    // `entry`, which would look it up once but makes room for an insert first: a map just
    // parsed is full, and it grew for it.)
    if present[0] {
        let naming: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter(|value| connection_options(value).next().is_some())
            .cloned()
            .collect();
        headers.remove(header::CONNECTION);
        for name in naming.iter().flat_map(connection_options) {
            // Looked up as it is, without making a name (an allocation for most).
            if let Ok(name) = std::str::from_utf8(name) {
                headers.remove(name);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present[i] {
            headers.remove(name);
        }
    }
}

/// The header names a `Connection` value lists, other than the options `close` (RFC 9110
/// reserves it as a field name) and `keep-alive` (removed as a hop-by-hop header anyway).
/// Read as bytes: the names are tokens, and the common values are these two options alone.
fn connection_options(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&byte| byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|name| {
            !name.is_empty()
                && !name.eq_ignore_ascii_case(b"close")
                && !name.eq_ignore_ascii_case(b"keep-alive")
        })
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

// The five, named where `server.forwarding_headers` names them.
const X_FORWARDED_FOR: HeaderName = forwarding(ForwardingHeaders::X_FORWARDED_FOR);
const X_REAL_IP: HeaderName = forwarding(ForwardingHeaders::X_REAL_IP);
const FORWARDED: HeaderName = forwarding(ForwardingHeaders::FORWARDED);
const X_FORWARDED_PROTO: HeaderName = forwarding(ForwardingHeaders::X_FORWARDED_PROTO);
const X_FORWARDED_HOST: HeaderName = forwarding(ForwardingHeaders::X_FORWARDED_HOST);

const fn forwarding(header: ForwardingHeaders) -> HeaderName {
    match header.name() {
        Some(name) => HeaderName::from_static(name),
        None => panic!("one forwarding header"),
    }
}

/// The client of a connection as the forwarding headers name it, made once per connection.
#[derive(Clone, Debug)]
pub struct ClientAddress {
    ip: IpAddr,
    /// Its `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are extended, not replaced.
    trusted: bool,
    /// `192.0.2.7`
    ip_value: HeaderValue,
    /// `for=192.0.2.7;proto=http` (RFC 7239)
    forwarded: HeaderValue,
}

impl ClientAddress {
    /// Describes the client at `ip`, trusted if it is in `trusted_proxies`.
    pub fn new(ip: IpAddr, trusted_proxies: &[IpNet]) -> ClientAddress {
        let ip = ip.to_canonical();
        // One buffer for both values (a connection of its own per request is common): the
        // address is a slice of `Forwarded`'s.
        let mut forwarded = Vec::with_capacity(64);
        let address = match ip {
            IpAddr::V4(v4) => {
                forwarded.extend_from_slice(b"for=");
                push_ipv4(&mut forwarded, v4);
                4..forwarded.len()
            }
            IpAddr::V6(v6) => {
                forwarded.extend_from_slice(format!("for=\"[{v6}]\"").as_bytes());
                6..forwarded.len() - 2
            }
        };
        forwarded.extend_from_slice(b";proto=http");
        let forwarded = Bytes::from(forwarded);
        let value =
            |bytes| HeaderValue::from_maybe_shared(bytes).expect("an address is a header value");
        ClientAddress {
            ip,
            trusted: trusted_proxies.iter().any(|net| net.contains(&ip)),
            ip_value: value(forwarded.slice(address)),
            forwarded: value(forwarded),
        }
    }

    /// Sets the forwarding headers in `set` of a request from this client to `host`: the
    /// client's own are replaced, or, from a trusted proxy, extended. An untrusted client's
    /// own forwarding headers never pass: those not in `set` are removed. Makes room for the
    /// token as well.
    pub fn set_forwarding_headers(
        &self,
        headers: &mut HeaderMap,
        host: Option<HeaderValue>,
        set: ForwardingHeaders,
    ) {
        // Room for every added header at once: a new connection's first map is only as large
        // as its request, and would grow (a reallocation and a rehash) several times.
        headers.reserve(set.len() + 1);
        let sets = |header| set.contains(header);
        if !self.trusted {
            let ip = || self.ip_value.clone();
            put(
                headers,
                X_FORWARDED_FOR,
                sets(ForwardingHeaders::X_FORWARDED_FOR).then(ip),
            );
            put(
                headers,
                X_REAL_IP,
                sets(ForwardingHeaders::X_REAL_IP).then(ip),
            );
            let forwarded = || self.forwarded.clone();
            put(
                headers,
                FORWARDED,
                sets(ForwardingHeaders::FORWARDED).then(forwarded),
            );
            let proto = || HeaderValue::from_static("http");
            put(
                headers,
                X_FORWARDED_PROTO,
                sets(ForwardingHeaders::X_FORWARDED_PROTO).then(proto),
            );
            let host = host.filter(|_| sets(ForwardingHeaders::X_FORWARDED_HOST));
            put(headers, X_FORWARDED_HOST, host);
            return;
        }
        // A trusted proxy's pass as they are, extended with this hop where the set says so.
        if sets(ForwardingHeaders::X_FORWARDED_FOR) {
            let xff = appended(headers, &X_FORWARDED_FOR, self.ip_value.as_bytes());
            headers.insert(X_FORWARDED_FOR, xff);
        }
        if sets(ForwardingHeaders::FORWARDED) {
            let forwarded = appended(headers, &FORWARDED, self.forwarded.as_bytes());
            headers.insert(FORWARDED, forwarded);
        }
        if sets(ForwardingHeaders::X_REAL_IP) && !headers.contains_key(X_REAL_IP) {
            headers.insert(X_REAL_IP, self.ip_value.clone());
        }
        if sets(ForwardingHeaders::X_FORWARDED_PROTO) && !headers.contains_key(X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
        let host = host.filter(|_| sets(ForwardingHeaders::X_FORWARDED_HOST));
        if let (false, Some(host)) = (headers.contains_key(X_FORWARDED_HOST), host) {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }

    /// Returns the client's address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

/// Sets `name` to `value`, or removes it.
fn put(headers: &mut HeaderMap, name: HeaderName, value: Option<HeaderValue>) {
    match value {
        Some(value) => headers.insert(name, value),
        None => headers.remove(name),
    };
}

/// Writes `ip` in dotted decimal (what its `Display` writes, without the formatting machinery).
fn push_ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

/// Returns every value of `name` joined by `, `, with `ours` last.
fn appended(headers: &HeaderMap, name: &HeaderName, ours: &[u8]) -> HeaderValue {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let value = value.as_bytes().trim_ascii();
        if !value.is_empty() {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(ours);
    HeaderValue::from_bytes(&out).expect("header values joined by a comma make a header value")
}

/// Tells whether a `Host` value is a valid `host[:port]` (RFC 9110 §7.2, RFC 3986 §3.2.2).
pub fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        match value.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &value[1..end];
                let ok = !literal.is_empty()
                    && literal
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
                if !ok {
                    return false;
                }
                (&value[..=end], &value[end + 1..])
            }
            None => return false,
        }
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    let name_ok = host.first() == Some(&b'[')
        || (!host.is_empty() && host.iter().all(|&b| REG_NAME[usize::from(b)]));
    port_ok && name_ok
}

/// The bytes a registered name may hold: unreserved, sub-delims and `%` (RFC 3986 §3.2.2),
/// as a table, since every request's `Host` is checked.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_forwarding_header_is_set_under_the_name_the_configuration_takes() {
        let set = [
            (ForwardingHeaders::X_FORWARDED_FOR, X_FORWARDED_FOR),
            (ForwardingHeaders::X_REAL_IP, X_REAL_IP),
            (ForwardingHeaders::FORWARDED, FORWARDED),
            (ForwardingHeaders::X_FORWARDED_PROTO, X_FORWARDED_PROTO),
            (ForwardingHeaders::X_FORWARDED_HOST, X_FORWARDED_HOST),
        ];
        for (header, name) in set {
            assert_eq!(ForwardingHeaders::named(name.as_str()), Some(header));
        }
        assert_eq!(FORWARDED, header::FORWARDED);
        assert_eq!(ForwardingHeaders::ALL.name(), None);
        assert_eq!(ForwardingHeaders::NONE.name(), None);
    }

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
        h.append("connection", HeaderValue::from_static("x-second-hop"));
        h.insert("x-second-hop", HeaderValue::from_static("2"));
        h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn connection_options_that_name_no_header_remove_only_connection() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.append("connection", HeaderValue::from_static(" Keep-Alive ,"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Close, X-Hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn a_connection_value_with_a_name_that_is_not_a_token_still_removes_the_others() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_bytes(b"caf\xe9, X-Hop,,\tx-other-hop ").unwrap(),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-other-hop", HeaderValue::from_static("2"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn removing_connection_from_a_full_map_does_not_grow_it() {
        // As hyper makes it: room for the fields parsed, no more.
        let mut h = HeaderMap::with_capacity(2);
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let mut i = 0;
        while h.len() < h.capacity() {
            h.insert(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
            i += 1;
        }
        let room = h.capacity();
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::CONNECTION));
        assert_eq!(h.capacity(), room);
    }

    #[test]
    fn an_untrusted_clients_forwarding_headers_are_replaced() {
        let client = ClientAddress::new("127.0.0.2".parse().unwrap(), &[]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
        h.insert("forwarded", HeaderValue::from_static("for=10.0.0.1"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        client.set_forwarding_headers(
            &mut h,
            Some(HeaderValue::from_static("a.example")),
            ForwardingHeaders::ALL,
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "127.0.0.2");
        assert_eq!(h["x-real-ip"], "127.0.0.2");
        assert_eq!(h["forwarded"], "for=127.0.0.2;proto=http");
        assert_eq!(h["x-forwarded-host"], "a.example");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_trusted_proxys_forwarding_headers_are_extended() {
        let nets = ["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let client = ClientAddress::new("::1".parse().unwrap(), &nets);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("192.0.2.2"));
        h.insert("forwarded", HeaderValue::from_static("for=192.0.2.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        client.set_forwarding_headers(
            &mut h,
            Some(HeaderValue::from_static("a.example")),
            ForwardingHeaders::ALL,
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 192.0.2.2, ::1");
        assert_eq!(h["forwarded"], "for=192.0.2.1, for=\"[::1]\";proto=http");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "::1");
        let mapped = ClientAddress::new("::ffff:10.1.2.3".parse().unwrap(), &nets);
        assert!(mapped.trusted, "an IPv4-mapped address is judged as IPv4");
    }

    #[test]
    fn headers_left_out_of_the_set_are_not_sent_and_an_untrusted_clients_own_are_removed() {
        let spoofed = || {
            let mut h = HeaderMap::new();
            for name in ForwardingHeaders::NAMES {
                h.insert(name, HeaderValue::from_static("10.6.6.6"));
            }
            h.insert("x-kept", HeaderValue::from_static("1"));
            h
        };
        let untrusted = ClientAddress::new("192.0.2.9".parse().unwrap(), &[]);
        let host = || Some(HeaderValue::from_static("a.example"));
        let mut h = spoofed();
        untrusted.set_forwarding_headers(&mut h, host(), ForwardingHeaders::NONE);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));

        let only = ForwardingHeaders::X_FORWARDED_FOR.with(ForwardingHeaders::X_FORWARDED_HOST);
        let mut h = spoofed();
        untrusted.set_forwarding_headers(&mut h, host(), only);
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
        assert_eq!(h["x-forwarded-host"], "a.example");
        for gone in ["x-real-ip", "forwarded", "x-forwarded-proto"] {
            assert!(!h.contains_key(gone), "{gone} passed");
        }

        // A trusted proxy's pass untouched where the set leaves them out.
        let nets = ["192.0.2.0/24".parse().unwrap()];
        let trusted = ClientAddress::new("192.0.2.9".parse().unwrap(), &nets);
        let mut h = spoofed();
        trusted.set_forwarding_headers(&mut h, host(), ForwardingHeaders::X_FORWARDED_FOR);
        assert_eq!(h["x-forwarded-for"], "10.6.6.6, 192.0.2.9");
        assert_eq!(h["forwarded"], "10.6.6.6");
        assert_eq!(h["x-real-ip"], "10.6.6.6");
        assert_eq!(h.len(), 6);
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.199.250.255",
            "127.0.0.1",
        ] {
            let address = ClientAddress::new(ip.parse().unwrap(), &[]);
            assert_eq!(address.ip_value, ip);
            assert_eq!(address.forwarded, format!("for={ip};proto=http").as_str());
        }
        let address = ClientAddress::new("2001:db8::7".parse().unwrap(), &[]);
        assert_eq!(address.ip_value, "2001:db8::7");
        assert_eq!(address.forwarded, "for=\"[2001:db8::7]\";proto=http");
        // An IPv4 client on an IPv6 socket is named as IPv4.
        let address = ClientAddress::new("::ffff:192.0.2.7".parse().unwrap(), &[]);
        assert_eq!(address.ip_value, "192.0.2.7");
    }

    #[test]
    fn host_values_are_validated() {
        for good in [
            "a.example",
            "a.example:8080",
            "[::1]:80",
            "[::1]",
            "127.0.0.1",
            "x:",
            "a-b_c~d%41!$&'()*+,;=.example",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a b",
            "user@a.example",
            "a.example/x",
            "a:80:80",
            "[::1",
            "[zz]",
            "a:x",
            ":80",
            "a?b",
            "a\"b",
            "a<b",
            "a\u{7f}b",
            "\u{e9}.example",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn only_the_access_token_parameter_is_dropped() {
        let mut out = String::new();
        push_query_without_access_token(&mut out, "access_token_x=1&access_token=2");
        assert_eq!(out, "?access_token_x=1");
    }
}
