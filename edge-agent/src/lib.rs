//! edge-agent
