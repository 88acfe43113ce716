//! Service-account tokens: obtained from the Mosaic identity service, cached per account,
//! refreshed ahead of expiry by one background task per account.

pub mod account;
pub mod client;
pub mod refresh;
pub mod token;

pub use account::{Account, TokenUnavailable};
pub use client::{Grant, IdentityClient, IdentityError};
pub use token::Token;
