//! Who may borrow a route's account: client networks, methods, paths below the prefix and a
//! marker header, each optional; every rule given must hold. A refusal costs no token
//! request and reaches no upstream.

use crate::config::AccessRules;
use crate::secret::constant_time_eq;
use crate::secret::Secret;
use crate::tls::ClientCert;
use http::header::{HeaderMap, HeaderName};
use http::Method;
use ipnet::IpNet;
use std::net::IpAddr;

/// Which rule refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the client's address is not in the route's access.networks")]
    Network,
    #[error("the method is not in the route's access.methods")]
    Method,
    #[error("the path is not in the route's access.paths")]
    Path,
    #[error("the route's access.header is missing or wrong")]
    Marker,
    #[error("no client certificate, or none the route's access.client_cert names")]
    ClientCert,
}

/// A route's access rules, ready to check.
#[derive(Debug, Default)]
pub struct Access {
    networks: Vec<IpNet>,
    methods: Vec<Method>,
    paths: Vec<String>,
    marker: Option<(HeaderName, Secret)>,
    client_cert: Vec<String>,
}

impl Access {
    /// Prepares the rules of a route's configuration.
    pub fn new(rules: &AccessRules) -> Access {
        Access {
            networks: rules.networks.clone(),
            methods: rules.methods.clone(),
            paths: rules.paths.clone(),
            marker: rules.marker.clone(),
            client_cert: rules.client_cert.clone(),
        }
    }

    /// Checks a request from `client` (with `cert`, if it presented one over TLS) with
    /// `method`, the path `rest` below the route's prefix, and `headers`.
    pub fn check(
        &self,
        client: IpAddr,
        cert: Option<&ClientCert>,
        method: &Method,
        rest: &str,
        headers: &HeaderMap,
    ) -> Result<(), Denied> {
        if !self.client_cert.is_empty()
            && !cert.is_some_and(|c| self.client_cert.iter().any(|w| c.matches(w)))
        {
            return Err(Denied::ClientCert);
        }
        if !self.networks.is_empty() && !self.networks.iter().any(|n| n.contains(&client)) {
            return Err(Denied::Network);
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Err(Denied::Method);
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|p| path_matches(p, rest)) {
            return Err(Denied::Path);
        }
        if let Some((name, value)) = &self.marker {
            let mut sent = headers.get_all(name).iter();
            let ok = match (sent.next(), sent.next()) {
                (Some(one), None) => constant_time_eq(one.as_bytes(), value.expose().as_bytes()),
                _ => false,
            };
            if !ok {
                return Err(Denied::Marker);
            }
        }
        Ok(())
    }

    /// Returns the marker header, which is removed before forwarding.
    pub fn marker(&self) -> Option<&HeaderName> {
        self.marker.as_ref().map(|(name, _)| name)
    }
}

/// `/graphql` matches itself; `*` matches one segment; a trailing `/**` matches the rest,
/// nothing included (`/files/**` matches `/files` and everything below it).
fn path_matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (Some("**"), _) => return want.next().is_none(),
            (None, None) => return true,
            (Some(w), Some(g)) if w == g || (w == "*" && !g.is_empty()) => {}
            (None, Some(_)) | (Some(_), _) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns_match_segments() {
        assert!(path_matches("/graphql", "/graphql"));
        assert!(!path_matches("/graphql", "/graphql/x"));
        assert!(!path_matches("/graphql", "/graphqlx"));
        assert!(path_matches("/v1/*/items", "/v1/a/items"));
        assert!(!path_matches("/v1/*/items", "/v1//items"));
        assert!(path_matches("/files/**", "/files/a/b"));
        assert!(path_matches("/files/**", "/files/"));
        assert!(!path_matches("/files/**", "/filesx/a"));
        assert!(path_matches("/**", "/anything/at/all"));
    }

    #[test]
    fn the_marker_is_compared_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
