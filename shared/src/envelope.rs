//! The envelope (filled in by the wire work).
