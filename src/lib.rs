//! The embsync worker (being written).
