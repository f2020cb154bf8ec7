//! virtio-blk request parsing and queue handling on guest-controlled descriptor tables.
//!
//! Input: a flags byte then an image of guest memory (see `ringvm::fuzz::block`). Run:
//! `cargo +nightly fuzz run blk_request fuzz/corpus/blk_request`. The corpus is replayed by
//! `cargo test --lib fuzz::` (test_block_corpus_replays_without_panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringvm::fuzz::block::fuzz_one(data);
});
