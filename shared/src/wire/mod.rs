//! The agent↔hub wire protocol (filled in by the wire work).
