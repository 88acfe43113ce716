//! The forwarding path. A request goes through named phases: request filter (refuse what
//! this proxy never serves; judge the path, [`path`]), pick upstream ([`route`]), token, rewrite ([`headers`]), forward
//! ([`pool`]), response filter ([`inspect`]: a token rejection leads to one refresh and at
//! most one replay of what [`replay`] kept); upgraded connections are spliced by [`upgrade`]; [`upstream`] keeps
//! each upstream within its budget and its connections through cancellations. [`error`] maps every
//! failure to one status by who is at fault.

pub mod access;
pub mod body;
pub mod error;
pub mod headers;
pub mod inspect;
pub mod path;
pub mod pool;
pub mod record;
pub mod replay;
pub mod route;
pub mod service;
pub mod upgrade;
pub mod upstream;

pub use body::ProxyBody;
pub use error::ProxyError;
pub use route::{Route, RouteTable};
pub use service::{Proxy, ProxyService};
