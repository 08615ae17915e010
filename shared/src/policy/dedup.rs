//! Per-origin dedup window (filled in by the dedup work).
