//! virtio-blk request parsing and queue handling on guest-controlled descriptor tables.
//!
//! Input: a flags byte (bit 0 EVENT_IDX, bit 1 read-only disk, bits 2-3 queue size 2..16)
//! followed by an image of guest memory from address 0 (descriptor table, avail ring, used
//! ring, buffers). Run: `cargo +nightly fuzz run blk_request fuzz/corpus/blk_request`.
//! The corpus is replayed by `cargo test --lib fuzz` (test_fuzz_corpus_replays_without_panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringvm::devices::virtio::block::fuzz::fuzz_one(data);
});
