//! Helpers for meshbridge end-to-end tests.
