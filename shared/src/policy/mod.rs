//! Pure policies.

pub mod dedup;
