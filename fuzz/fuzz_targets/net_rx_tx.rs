//! virtio-net RX, TX and control chains through their queue handlers, with made-up tap
//! results (there is no tap in the fuzzer).
//!
//! Input: a flags byte then an image of guest memory (see `ringvm::fuzz::net`). Run:
//! `cargo +nightly fuzz run net_rx_tx fuzz/corpus/net_rx_tx`. The corpus is replayed by
//! `cargo test --lib fuzz::` (test_net_corpus_replays_without_panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringvm::fuzz::net::fuzz_one(data);
});
