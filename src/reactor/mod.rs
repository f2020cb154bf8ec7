//! Per-core io_uring reactors (placeholder until the block work lands).
