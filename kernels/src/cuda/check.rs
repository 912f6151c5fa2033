//! GPU checks (filled in below).
