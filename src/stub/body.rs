//! A streamed body of a known pattern, so large transfers can be checked without storing them.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

const CHUNK: usize = 64 * 1024;

/// Returns byte number `i` of the pattern.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A body of `len` pattern bytes, produced chunk by chunk.
#[derive(Debug)]
pub struct PatternBody {
    sent: u64,
    len: u64,
}

impl PatternBody {
    /// Creates a body of `len` bytes.
    pub fn new(len: u64) -> PatternBody {
        PatternBody { sent: 0, len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let left = self.len - self.sent;
        if left == 0 {
            return Poll::Ready(None);
        }
        let n = left.min(CHUNK as u64);
        let start = self.sent;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.sent)
    }
}
