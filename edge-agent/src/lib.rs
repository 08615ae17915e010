//! edge-agent

pub mod broker;
