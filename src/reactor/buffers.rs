//! Guest memory as io_uring fixed buffers, registered lazily in chunks.
//!
//! A READ_FIXED/WRITE_FIXED needs no page-table walk and no page pinning per request (the
//! A/B in perf/RESULTS.md: 0.83× the IOPS without). But registering a buffer pins and so
//! faults in all of it: the whole guest at once took 130 ms for 64 MiB of transparent
//! hugepages on the lab's host, pushing the guest's first I/O from ~12 ms to ~150 ms. So
//! the ring gets a sparse buffer table at set-up, and each chunk of guest memory
//! ([`CHUNK_MIN`] or larger, so that the table covers all of it) is registered the first
//! time a request lands in it: one `io_uring_register` per chunk for the life of the VM,
//! none per request once the guest's buffers have been seen.

use std::io;

use io_uring::Submitter;

/// Entries of the ring's sparse buffer table (the kernel's limit, IORING_MAX_REG_BUFFERS).
pub const TABLE_ENTRIES: u32 = 1 << 14;
/// Smallest chunk registered at once: a 2 MiB hugepage.
pub const CHUNK_MIN: usize = 2 << 20;
/// Largest buffer io_uring registers.
const CHUNK_MAX: usize = 1 << 30;

#[derive(Debug, Clone, Copy)]
struct Region {
    start: usize,
    len: usize,
    /// Table index of the region's first chunk.
    first: u32,
}

/// The ring's fixed buffers over guest memory.
#[derive(Debug, Default)]
pub struct FixedBuffers {
    regions: Vec<Region>,
    chunk_shift: u32,
    /// One bit per table entry: registered.
    registered: Vec<u64>,
    /// Off by option, or registration failed once (memlock, an old kernel): requests use
    /// readv/writev.
    disabled: bool,
}

impl FixedBuffers {
    /// An empty table; `enabled: false` never lays memory out.
    pub fn new(enabled: bool) -> Self {
        FixedBuffers {
            disabled: !enabled,
            ..Default::default()
        }
    }

    /// False when off by option or after a failed registration.
    pub fn enabled(&self) -> bool {
        !self.disabled
    }

    /// Turns fixed buffers off for good.
    pub fn disable(&mut self) {
        self.disabled = true;
    }

    /// Lays guest memory (host start, length per region) over the table. Returns false when
    /// there is nothing to lay out or it would not fit.
    pub fn set_memory(&mut self, regions: &[(*mut u8, usize)]) -> bool {
        let total: usize = regions.iter().map(|r| r.1).sum();
        if total == 0 || self.disabled {
            return false;
        }
        // The smallest power-of-two chunk, at least CHUNK_MIN, that covers every region
        // (each rounded up to whole chunks) within the table.
        let mut chunk = CHUNK_MIN;
        loop {
            let need: usize = regions.iter().map(|r| r.1.div_ceil(chunk)).sum();
            if need <= TABLE_ENTRIES as usize {
                break;
            }
            if chunk >= CHUNK_MAX {
                return false;
            }
            chunk *= 2;
        }
        let mut first = 0u32;
        self.regions = regions
            .iter()
            .map(|&(start, len)| {
                let r = Region {
                    start: start as usize,
                    len,
                    first,
                };
                first += len.div_ceil(chunk) as u32;
                r
            })
            .collect();
        self.chunk_shift = chunk.trailing_zeros();
        self.registered = vec![0; (TABLE_ENTRIES as usize).div_ceil(64)];
        true
    }

    /// True once guest memory is laid out.
    pub fn active(&self) -> bool {
        !self.regions.is_empty() && !self.disabled
    }

    /// Forgets the layout (the caller unregisters the table).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.registered.clear();
    }

    /// The table index of the chunk holding all of `[addr, addr + len)`, registering the
    /// chunk first if this is its first use. `None` when no memory is laid out, the range
    /// is not in one chunk of guest memory, or registration failed (then never again).
    pub fn index(&mut self, submitter: &Submitter<'_>, addr: usize, len: usize) -> Option<u16> {
        if self.disabled || len == 0 {
            return None;
        }
        let end = addr.checked_add(len)?;
        let r = *self
            .regions
            .iter()
            .find(|r| r.start <= addr && end <= r.start + r.len)?;
        let chunk = (addr - r.start) >> self.chunk_shift;
        if ((end - 1 - r.start) >> self.chunk_shift) != chunk {
            return None;
        }
        let index = r.first + chunk as u32;
        let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
        if self.registered[word] & bit == 0 {
            let off = chunk << self.chunk_shift;
            let n = (r.len - off).min(1 << self.chunk_shift);
            if let Err(e) = register(submitter, index, r.start + off, n) {
                log::info!(
                    "guest memory cannot be registered as io_uring fixed buffers ({e}); requests use readv/writev"
                );
                self.disabled = true;
                return None;
            }
            self.registered[word] |= bit;
        }
        u16::try_from(index).ok()
    }
}

fn register(submitter: &Submitter<'_>, index: u32, start: usize, len: usize) -> io::Result<()> {
    let iov = libc::iovec {
        iov_base: start as *mut libc::c_void,
        iov_len: len,
    };
    // The range is guest memory, mapped for the life of the VM; registration pins its pages,
    // so even an unmap could not free them under the kernel. The table is dropped when the
    // reactor's last queue detaches.
    // SAFETY: the iovec describes that guest memory, valid until unregistered (see above).
    unsafe { submitter.register_buffers_update(index, &[iov], None) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> io_uring::IoUring {
        let ring = io_uring::IoUring::new(8).unwrap();
        ring.submitter()
            .register_buffers_sparse(TABLE_ENTRIES)
            .unwrap();
        ring
    }

    #[test]
    fn test_index_registers_each_chunk_once_and_maps_regions() {
        let mem = vec![0u8; 3 * CHUNK_MIN + 4096];
        let base = mem.as_ptr() as usize;
        let (a, b) = (base as *mut u8, (base + CHUNK_MIN) as *mut u8);
        let mut f = FixedBuffers::default();
        // Two regions: one chunk, then two and a bit.
        assert!(f.set_memory(&[(a, CHUNK_MIN), (b, 2 * CHUNK_MIN + 4096)]));
        let ring = ring();
        let s = ring.submitter();
        assert_eq!(f.index(&s, base + 100, 512), Some(0));
        assert_eq!(f.index(&s, base + CHUNK_MIN, 4096), Some(1));
        assert_eq!(f.index(&s, base + 3 * CHUNK_MIN, 4096), Some(3));
        assert_eq!(
            f.registered[0], 0b1011,
            "only the chunks used are registered"
        );
        // Straddling two chunks, or outside guest memory: no fixed buffer.
        assert_eq!(f.index(&s, base + 2 * CHUNK_MIN - 512, 1024), None);
        assert_eq!(f.index(&s, base + 4 * CHUNK_MIN, 16), None);
    }

    #[test]
    fn test_set_memory_grows_chunks_to_fit_the_table() {
        let mut f = FixedBuffers::default();
        let big = TABLE_ENTRIES as usize * CHUNK_MIN * 3;
        assert!(f.set_memory(&[(4096 as *mut u8, big)]));
        assert_eq!(1usize << f.chunk_shift, CHUNK_MIN * 4);
        assert!(!FixedBuffers::default().set_memory(&[]));
    }
}
