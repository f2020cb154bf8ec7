//! Fuzz harnesses (the cargo-fuzz targets in `fuzz/` call them) and the generated-chain
//! tests that run on every `cargo test`. Built only with `cfg(test)` or the `fuzz` feature,
//! never into the release binary.
//!
//! - [`block`]: virtio-blk requests through the parser and a [`BlockQueue`](crate::devices::virtio::block::handler::BlockQueue).
//! - [`net`]: virtio-net RX, TX and control chains through their queue handlers.
//! - [`pci`]: PCI configuration space (mechanism #1, ECAM, BAR sizing and moves) and the
//!   virtio-pci BAR (common configuration, MSI-X table and PBA) through the bus interface.
//! - [`chains`]: a structure-aware generator of descriptor chains for [`block`] and [`net`].
//! - [`memory`]: the queue harnesses' guest memory, loaded from each input and checked
//!   after the device ran (bulk copies and compares: the fuzzer instruments byte loops).
//!
//! A queue harness sets up once per thread (guest memory, a dormant ring, one handler per
//! queue shape) and resets per input: the input's memory image is written over guest
//! memory, the handler is re-armed with a fresh queue, and the operations it queues are
//! answered with made-up results ([`crate::reactor::inline`]), so an input costs no system
//! call beyond an occasional eventfd write.

pub mod block;
pub mod chains;
pub mod memory;
pub mod net;
pub mod pci;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::GuestMemory;

/// Guest memory of a queue harness: two regions, so buffers may straddle a boundary (small:
/// every input rewrites and rescans all of it).
pub const REGION: usize = 16 << 10;
/// All of it.
pub const MEM_SIZE: usize = 2 * REGION;

/// The queue harnesses' guest memory.
pub fn guest_memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ])
    .expect("64 KiB of anonymous memory")
}

/// Writes `image` from address 0 and zeroes the rest of guest memory (the chain generator's
/// reset; the harnesses use [`memory::GuestImage::load`], which zeroes only what may be dirty).
pub fn load_image(mem: &GuestMemory, image: &[u8]) {
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("inside guest memory");
    // Zero the rest in chunks (no allocation per input).
    const ZERO: [u8; 4096] = [0; 4096];
    let mut at = n;
    while at < MEM_SIZE {
        let len = (MEM_SIZE - at).min(ZERO.len());
        mem.write_slice(&ZERO[..len], GuestAddress(at as u64))
            .expect("inside guest memory");
        at += len;
    }
}

/// xorshift64: a seeded generator for the stable tests (no dependency, same sequence on
/// every machine).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// Runs `f` on every file of `fuzz/corpus/<target>`; returns how many there were.
#[cfg(test)]
pub fn replay_corpus(target: &str, mut f: impl FnMut(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus missing at {}: {e}", dir.display()));
    let mut n = 0;
    for e in entries {
        let p = e.expect("readable corpus directory").path();
        f(&std::fs::read(&p).expect("readable corpus file"));
        n += 1;
    }
    n
}
