//! Judging a request path before it is routed: percent-encoded unreserved characters
//! decoded, dot segments removed (RFC 3986 §2.3, §5.2.4), nothing else merged, and every
//! form that an upstream could read differently refused. What is routed and forwarded is
//! exactly the path judged here.

use std::borrow::Cow;

/// Why a path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path holds a backslash")]
    Backslash,
    #[error("the path holds a malformed percent-encoding")]
    BadPercent,
    #[error(
        "the path holds an encoded \"/\" or \"\\\" (%2F, %5C), which this route does not allow"
    )]
    EncodedSlash,
    #[error("the path holds a percent-encoded dot segment")]
    EncodedDotSegment,
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path's dot segments lead out of the route it names")]
    EscapesRoute,
}

/// A path as judged.
#[derive(Debug, PartialEq, Eq)]
pub struct Judged<'a> {
    /// The normalised path: the one routed and forwarded.
    pub path: Cow<'a, str>,
    /// The decoded path before its dot segments were removed, if it had any: the route it
    /// names must be the route of `path`.
    pub before_dots: Option<String>,
    /// It holds `%2F` or `%5C` (forwarded encoded, only where the route allows it).
    pub encoded_slash: bool,
}

/// Judges an origin-form path. A path that needs no change (the usual case) is returned
/// borrowed, without allocating.
pub fn judge(path: &str) -> Result<Judged<'_>, PathError> {
    let plain = Judged {
        path: Cow::Borrowed(path),
        before_dots: None,
        encoded_slash: false,
    };
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(plain); // `*` of OPTIONS: no route takes it.
    };
    let needs_work = rest
        .split('/')
        .any(|s| s == "." || s == ".." || s.contains(['%', '\\']));
    if !needs_work {
        return Ok(plain);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let mut encoded_slash = false;
    let mut segments = Vec::new();
    let mut dots = false;
    for raw in rest.split('/') {
        let segment = decode_unreserved(raw, &mut encoded_slash)?;
        if segment == "." || segment == ".." {
            if segment.len() != raw.len() {
                return Err(PathError::EncodedDotSegment);
            }
            dots = true;
        }
        segments.push(segment);
    }
    let before_dots = dots.then(|| join(&segments));
    let segments = if dots {
        remove_dot_segments(segments)?
    } else {
        segments
    };
    let joined = join(&segments);
    Ok(Judged {
        path: if joined == path {
            Cow::Borrowed(path)
        } else {
            Cow::Owned(joined)
        },
        before_dots,
        encoded_slash,
    })
}

fn join(segments: &[Cow<'_, str>]) -> String {
    let mut out = String::with_capacity(segments.iter().map(|s| s.len() + 1).sum());
    for segment in segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// RFC 3986 §5.2.4 on the segments after the leading `/`, except that climbing above the
/// root is refused rather than ignored.
fn remove_dot_segments(segments: Vec<Cow<'_, str>>) -> Result<Vec<Cow<'_, str>>, PathError> {
    let last = segments.len().saturating_sub(1);
    let mut out = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match &*segment {
            "." => {}
            ".." => {
                out.pop().ok_or(PathError::AboveRoot)?;
            }
            _ => {
                out.push(segment);
                continue;
            }
        }
        // A trailing dot segment leaves the directory: `/a/b/..` is `/a/`.
        if i == last {
            out.push(Cow::Borrowed(""));
        }
    }
    Ok(out)
}

/// Decodes `%XX` where it stands for an unreserved character; keeps every other encoding
/// as it is, noting an encoded `/` or `\`.
fn decode_unreserved<'a>(
    raw: &'a str,
    encoded_slash: &mut bool,
) -> Result<Cow<'a, str>, PathError> {
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            let next = raw[i + 1..].find('%').map_or(raw.len(), |n| i + 1 + n);
            out.push_str(&raw[i..next]);
            i = next;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadPercent)?;
        let value = match (hex_value(hex[0]), hex_value(hex[1])) {
            (Some(high), Some(low)) => high << 4 | low,
            _ => return Err(PathError::BadPercent),
        };
        if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(value));
        } else {
            if matches!(value, b'/' | b'\\') {
                *encoded_slash = true;
            }
            out.push_str(&raw[i..i + 3]);
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str) -> String {
        judge(path).unwrap().path.into_owned()
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for path in ["/", "/media/graphql", "/a/b.c/..d/.e", "//double", "*"] {
            let judged = judge(path).unwrap();
            assert!(matches!(judged.path, Cow::Borrowed(_)), "{path}");
            assert_eq!(judged.path, path);
            assert_eq!(judged.before_dots, None);
        }
    }

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        assert_eq!(ok("/a/b/c/./../../g"), "/a/g");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/a//../b"), "/a/b");
        assert_eq!(ok("/./a"), "/a");
        let judged = judge("/media/../admin").unwrap();
        assert_eq!(judged.path, "/admin");
        assert_eq!(judged.before_dots.as_deref(), Some("/media/../admin"));
    }

    #[test]
    fn unreserved_characters_are_decoded_and_others_kept_encoded() {
        assert_eq!(ok("/m%65dia/%7Euser"), "/media/~user");
        assert_eq!(ok("/a%20b/%3f"), "/a%20b/%3f");
        assert_eq!(ok("/%252e%252e/x"), "/%252e%252e/x");
    }

    #[test]
    fn escapes_and_ambiguous_forms_are_refused() {
        assert_eq!(judge("/.."), Err(PathError::AboveRoot));
        assert_eq!(judge("/a/../.."), Err(PathError::AboveRoot));
        for encoded_dots in ["/%2e%2e/x", "/%2E%2E/x", "/.%2e/x", "/%2e./x", "/a/%2e/x"] {
            assert_eq!(
                judge(encoded_dots),
                Err(PathError::EncodedDotSegment),
                "{encoded_dots}"
            );
        }
        for backslash in ["/a\\..\\b", "/..\\x"] {
            assert_eq!(judge(backslash), Err(PathError::Backslash), "{backslash}");
        }
        for bad in ["/a%", "/a%2", "/a%zz"] {
            assert_eq!(judge(bad), Err(PathError::BadPercent), "{bad}");
        }
    }

    #[test]
    fn encoded_slashes_are_noted_and_kept_encoded() {
        for path in ["/a%2fb", "/a%2Fb", "/..%2fx", "/%2e%2e%5cx"] {
            let judged = judge(path).unwrap();
            assert!(judged.encoded_slash, "{path}");
            assert_eq!(judged.before_dots, None, "{path}");
        }
        assert_eq!(ok("/%2e%2e%5cx"), "/..%5cx");
    }
}
