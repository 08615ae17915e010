//! cloud-hub
