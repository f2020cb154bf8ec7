//! Per-reactor counters and histograms (placeholder until the block work lands).
