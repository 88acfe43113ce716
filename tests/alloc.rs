//! The token read on the request path allocates nothing. Its own binary: it counts every
//! allocation of the process.

use mosaic_auth_proxy::identity::refresh::RefreshPolicy;
use mosaic_auth_proxy::identity::{Account, Grant, Token};
use mosaic_auth_proxy::secret::Secret;
use std::time::Duration;

const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.c2ln";

#[test]
fn reading_the_cached_token_allocates_nothing() {
    let grant = Grant {
        access_token: Secret::new(JWT),
        lifetime: Duration::from_secs(3600),
        sent_at: tokio::time::Instant::now(),
    };
    let token = Token::new(grant, &RefreshPolicy::default(), 0.0).unwrap();
    let account = Account::with_token("a", token);
    // The first read on a thread may set up that thread's bookkeeping.
    assert!(account.usable_header().is_some());
    let counted = allocation_counter::measure(|| {
        for _ in 0..1000 {
            let header = account.usable_header().expect("a token is cached");
            std::hint::black_box(&header);
        }
    });
    assert_eq!(counted.count_total, 0, "{counted:?}");
}
