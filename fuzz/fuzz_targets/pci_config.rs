//! PCI configuration space (mechanism #1, ECAM, BAR sizing and moves) and the virtio-pci
//! BAR (common configuration, MSI-X table and PBA) through the bus interface.
//!
//! Input: a list of guest accesses (see `ringvm::fuzz::pci`). Run:
//! `cargo +nightly fuzz run pci_config fuzz/corpus/pci_config`. The corpus is replayed by
//! `cargo test --lib fuzz::` (test_pci_corpus_replays_without_panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringvm::fuzz::pci::fuzz_one(data);
});
