//! Service-account tokens: obtained from the Mosaic identity service, cached per account,
//! refreshed ahead of expiry (or at once after a rejection or a secret rotation) by one
//! background task per account. What happens when is decided in one place, [`lifecycle`]:
//! a pure function of the account's state, an event and `now`.

pub mod account;
pub mod breaker;
pub mod client;
pub mod lifecycle;
pub mod refresh;
pub mod refresher;
pub mod stats;
pub mod token;

pub use account::{Account, AccountStatus, Rejection, TokenUnavailable};
pub use client::{Grant, IdentityClient, IdentityError};
pub use token::Token;
