//! Telling a token rejection from any other answer, the Mosaic way (HTTP 200 with a GraphQL
//! error code) and the plain way (HTTP 401), without touching answers that cannot be one.

use super::body::ProxyBody;
use super::error::ProxyError;
use super::upstream::UpstreamBody;
use crate::mosaic;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

/// The largest answer read to look for a rejection; Mosaic's error replies are far smaller.
pub const INSPECT_LIMIT: u64 = 16 * 1024;

/// An upstream answer, judged.
pub enum Inspected {
    /// Not a rejection: pass it on.
    Pass(Response<ProxyBody>),
    /// The upstream refused the token, with this code (`HTTP_401` for a plain 401); the
    /// answer is kept untouched.
    Rejected(Response<ProxyBody>, String),
}

/// Judges an answer. Only a small, uncompressed JSON answer with status 200 is read (and then
/// passed on from memory); every other answer streams through untouched.
pub async fn inspect(response: Response<UpstreamBody>) -> Result<Inspected, ProxyError> {
    if passes_by_head(&response) {
        return Ok(Inspected::Pass(response.map(ProxyBody::Upstream)));
    }
    inspect_unpassed(response).await
}

/// Judges an answer that [`passes_by_head`] did not pass: a 401, or a small JSON answer that
/// is read.
pub async fn inspect_unpassed(response: Response<UpstreamBody>) -> Result<Inspected, ProxyError> {
    if response.status() == StatusCode::UNAUTHORIZED {
        return Ok(Inspected::Rejected(
            response.map(ProxyBody::Upstream),
            "HTTP_401".to_owned(),
        ));
    }
    inspect_body(response).await
}

/// Whether an answer's head alone says it is no rejection: [`inspect`] would pass it on
/// untouched, without reading its body.
pub fn passes_by_head<B>(response: &Response<B>) -> bool {
    response.status() != StatusCode::UNAUTHORIZED
        && !may_be_rejection(response.status(), response.headers())
}

/// Reads a small JSON answer, which is then passed on from memory, and judges it.
async fn inspect_body(response: Response<UpstreamBody>) -> Result<Inspected, ProxyError> {
    let (parts, body) = response.into_parts();
    let bytes = Limited::new(body, INSPECT_LIMIT as usize)
        .collect()
        .await
        .map_err(ProxyError::UpstreamBody)?
        .to_bytes();
    let rejection = mosaic::token_rejection(&bytes);
    let response = Response::from_parts(parts, ProxyBody::full(bytes));
    Ok(match rejection {
        Some(code) => Inspected::Rejected(response, code.as_str().to_owned()),
        None => Inspected::Pass(response),
    })
}

/// Whether an answer's head leaves it possibly a Mosaic rejection: status 200, JSON, a
/// `Content-Length` within [`INSPECT_LIMIT`], not compressed. Each test is made only where
/// the ones before it passed: most answers are told apart by their status or their type.
fn may_be_rejection(status: StatusCode, headers: &HeaderMap) -> bool {
    let json = || {
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.trim_start();
                ct.starts_with("application/json")
                    || ct.starts_with("application/graphql-response+json")
            })
    };
    let small = || {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= INSPECT_LIMIT)
    };
    status == StatusCode::OK && json() && small() && !headers.contains_key(header::CONTENT_ENCODING)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(*name, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn only_small_uncompressed_json_answers_with_status_200_are_read() {
        let ok = StatusCode::OK;
        let json = ("content-type", "application/json; charset=utf-8");
        let small = ("content-length", "120");
        let read = |status, fields: &[_]| may_be_rejection(status, &head(fields));
        assert!(read(ok, &[json, small]));
        assert!(read(
            ok,
            &[
                ("content-type", " application/graphql-response+json"),
                small
            ]
        ));
        assert!(
            read(ok, &[json, ("content-length", "16384")]),
            "at the limit"
        );

        assert!(!read(StatusCode::BAD_REQUEST, &[json, small]), "not a 200");
        assert!(
            !read(ok, &[("content-type", "text/plain"), small]),
            "not JSON"
        );
        assert!(!read(ok, &[small]), "no type");
        assert!(!read(ok, &[json]), "no length (chunked)");
        assert!(!read(ok, &[json, ("content-length", "16385")]), "too large");
        assert!(
            !read(ok, &[json, ("content-length", "12x")]),
            "not a length"
        );
        assert!(
            !read(ok, &[json, small, ("content-encoding", "gzip")]),
            "compressed"
        );
    }
}
