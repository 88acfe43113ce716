//! Commands beside serving: `token` (one login, for curl experiments) and `probe` (a health
//! check that needs no shell tools, for a container's `HEALTHCHECK`).

pub mod probe;
pub mod token;
