//! Pure policies: which QUIC attempts get a handshake, the per-origin dedup window, the path that keeps
//! routes from looping, the routing engine and per-route dedup by message key.

pub mod admission;
pub mod dedup;
pub mod path;
pub mod route;
pub mod route_dedup;
