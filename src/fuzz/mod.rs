//! Fuzz harnesses (the cargo-fuzz targets in `fuzz/` call them) and the generated-chain
//! tests that run on every `cargo test`. Built only with `cfg(test)` or the `fuzz` feature,
//! never into the release binary.
//!
//! - [`block`]: virtio-blk requests through the parser and a [`BlockQueue`](crate::devices::virtio::block::handler::BlockQueue).
//! - [`net`]: virtio-net RX, TX and control chains through their queue handlers.
//! - [`pci`]: PCI configuration space (mechanism #1, ECAM, BAR sizing and moves) and the
//!   virtio-pci BAR (common configuration, MSI-X table and PBA) through the bus interface.
//! - [`chains`]: a structure-aware generator of descriptor chains for [`block`] and [`net`].
//!
//! A queue harness sets up once per thread (guest memory, a dormant ring, one handler per
//! queue shape) and resets per input: the input's memory image is written over guest
//! memory, the handler is re-armed with a fresh queue, and the operations it queues are
//! answered with made-up results ([`crate::reactor::inline`]), so an input costs no system
//! call beyond an occasional eventfd write.

pub mod block;
pub mod chains;
pub mod net;
pub mod pci;

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion as _,
    MemoryRegionAddress,
};

use crate::devices::virtio::block::driver::{TestDriver, F_INDIRECT, F_WRITE};
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

/// Writes `image` from address 0 and zeroes the rest of guest memory.
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

/// The guest ranges a device may write for the queue whose descriptor table is at `desc`
/// (`size` entries): every device-writable descriptor, directly in the table or in an
/// indirect table one level down, plus `extra` (the used ring). Read from the image the
/// device saw, before it ran.
pub fn writable_ranges(
    image: &[u8],
    desc: u64,
    size: u16,
    extra: (u64, u64),
    out: &mut Vec<(u64, u64)>,
) {
    out.clear();
    out.push(extra);
    let byte = |a: u64| image.get(a as usize).copied().unwrap_or(0);
    let read = |a: u64, n: usize| {
        (0..n).fold(0u64, |v, i| {
            v | u64::from(byte(a.wrapping_add(i as u64))) << (8 * i)
        })
    };
    let desc_at = |a: u64| {
        let field = |off: u64, n| read(a.wrapping_add(off), n);
        (field(0, 8), field(8, 4), field(12, 2) as u16)
    };
    for i in 0..u64::from(size) {
        let (addr, len, flags) = desc_at(desc + 16 * i);
        if flags & F_INDIRECT != 0 {
            // Past the image, guest memory is zero: no flags, nothing writable.
            for j in 0..(len / 16).min(MEM_SIZE as u64 / 16) {
                let at = addr.wrapping_add(16 * j);
                if at >= image.len() as u64 {
                    break;
                }
                let (a, l, fl) = desc_at(at);
                if fl & F_WRITE != 0 {
                    out.push((a, a.saturating_add(l)));
                }
            }
        } else if flags & F_WRITE != 0 {
            out.push((addr, addr.saturating_add(len)));
        }
    }
}

/// Panics if guest memory differs from `image` (zero-padded) anywhere outside `allowed`
/// ([`writable_ranges`] of `image` for the queue whose table is at `desc`, `size`
/// entries): the device wrote where the driver gave it no writable buffer. A guest may
/// point a writable buffer at its own descriptors, and then the chains the device walks
/// after such a write are not the image's; the check is skipped for such inputs (the
/// generated chains never do this, so the stable tests always check).
pub fn assert_writes_within(
    mem: &GuestMemory,
    image: &[u8],
    (desc, size): (u64, u16),
    allowed: &[(u64, u64)],
) {
    let tables = descriptor_memory(image, desc, size);
    let rewrites_tables = allowed[1..]
        .iter()
        .any(|&(s, e)| tables.iter().any(|&(ts, te)| s < te && ts < e));
    if rewrites_tables {
        return;
    }
    if let Some((a, b)) = writes_outside(mem, image, allowed) {
        panic!("device wrote {b:#x} at guest address {a:#x} outside every device-writable buffer");
    }
}

/// The descriptor table and every indirect table it names, as read from `image`.
fn descriptor_memory(image: &[u8], desc: u64, size: u16) -> Vec<(u64, u64)> {
    let mut out = vec![(desc, desc + 16 * u64::from(size))];
    for i in 0..u64::from(size) {
        let at = (desc + 16 * i) as usize;
        let Some(d) = image.get(at..at + 16) else {
            break;
        };
        let flags = u16::from_le_bytes([d[12], d[13]]);
        if flags & F_INDIRECT != 0 {
            let addr = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
            out.push((addr, addr.saturating_add(u64::from(len))));
        }
    }
    out
}

/// The first byte that changed outside `allowed`: (address, new value).
fn writes_outside(mem: &GuestMemory, image: &[u8], allowed: &[(u64, u64)]) -> Option<(u64, u8)> {
    for region in mem.iter() {
        let start = region.start_addr().0 as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .expect("mapped region");
        // SAFETY: the region is mapped for the life of `mem` and `len` bytes long; the
        // harness thread is the only one touching guest memory while it checks.
        let bytes = unsafe { std::slice::from_raw_parts(host, region.len() as usize) };
        let before = |at: usize| image.get(at).copied().unwrap_or(0);
        // Whole chunks compare with memcmp (the fuzzers instrument every byte comparison
        // of a loop); only a chunk that changed is walked byte by byte.
        const CHUNK: usize = 256;
        const ZERO: [u8; CHUNK] = [0; CHUNK];
        for c in (0..bytes.len()).step_by(CHUNK) {
            let n = CHUNK.min(bytes.len() - c);
            let lo = (start + c).min(image.len());
            let hi = (start + c + n).min(image.len());
            let k = hi - lo;
            if bytes[c..c + k] == image[lo..hi] && bytes[c + k..c + n] == ZERO[..n - k] {
                continue;
            }
            let (cs, ce) = ((start + c) as u64, (start + c + n) as u64);
            if allowed.iter().any(|&(s, e)| s <= cs && ce <= e) {
                continue;
            }
            for (i, &b) in bytes[c..c + n].iter().enumerate() {
                let at = start + c + i;
                let a = at as u64;
                if b != before(at) && !allowed.iter().any(|&(s, e)| s <= a && a < e) {
                    return Some((a, b));
                }
            }
        }
    }
    None
}

/// With [`assert_writes_within`]'s ranges: when no device-writable buffer overlaps the rings
/// (`[desc, used_end)`), the used ring can be trusted, so check it: the used index is the
/// handler's count, and every used entry names a head the driver made available, no more
/// often than it did.
pub fn check_used_ring(
    mem: &GuestMemory,
    image: &[u8],
    drv: &TestDriver,
    used: u16,
    popped: u16,
    allowed: &[(u64, u64)],
) {
    let (desc, avail, used_at, size) = (drv.desc.0, drv.avail.0, drv.used.0, drv.size);
    let rings_end = used_at + 6 + 8 * u64::from(size);
    if allowed[1..].iter().any(|&(s, e)| s < rings_end && desc < e) {
        return;
    }
    let idx: u16 = mem.read_obj(GuestAddress(used_at + 2)).expect("used ring");
    assert_eq!(idx, used, "the used index is what the handler wrote");
    if used > size || popped > size {
        // Entries wrapped around the rings: the image no longer shows them all.
        return;
    }
    let byte = |a: u64| u16::from(image.get(a as usize).copied().unwrap_or(0));
    let mut offered: Vec<u16> = (0..popped)
        .map(|i| {
            let at = avail + 4 + 2 * u64::from(i);
            byte(at) | byte(at + 1) << 8
        })
        .collect();
    for i in 0..used {
        let id: u32 = mem
            .read_obj(GuestAddress(used_at + 4 + 8 * u64::from(i)))
            .expect("used ring");
        let Some(k) = offered.iter().position(|&h| u32::from(h) == id) else {
            panic!("used entry {i} names head {id}, which the driver did not make available");
        };
        offered.swap_remove(k);
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
