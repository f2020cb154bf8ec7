//! A descriptor-chain walker that reads the descriptor table through one host pointer
//! instead of a guest-memory lookup per descriptor.
//!
//! It follows virtio-queue's `DescriptorChain` rules exactly (a chain is at most one table
//! long, an indirect table may not nest and must be a multiple of 16 bytes, the chain's
//! total length must fit in 32 bits) and, like it, ends early on a violation, leaving a last
//! descriptor that still has NEXT set: that is how the parser tells a broken chain.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::host_range;
use crate::devices::virtio::GuestMemory;

const DESC_SIZE: u64 = 16;
const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Iterator over the descriptors of one chain.
pub struct Chain<'a> {
    mem: &'a GuestMemory,
    /// Host address of the current table (main or indirect) when all `size` entries lie in
    /// one region; null otherwise (then each descriptor is read through `mem` at `gpa`).
    table: *const u8,
    gpa: u64,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    yielded: u32,
}

impl<'a> Chain<'a> {
    /// Walks the chain starting at `head` in the table at `desc_table` with `size` entries.
    /// Yields nothing when the table is not inside one guest memory region.
    pub fn new(mem: &'a GuestMemory, desc_table: GuestAddress, size: u16, head: u16) -> Self {
        let table = host_range(mem, desc_table.0, u64::from(size) * DESC_SIZE)
            .unwrap_or(std::ptr::null_mut());
        Chain {
            mem,
            table,
            gpa: desc_table.0,
            size,
            next: head,
            ttl: size,
            indirect: false,
            yielded: 0,
        }
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        if self.table.is_null() {
            // A table that straddles regions (or runs out of guest memory): read descriptor
            // by descriptor, exactly like virtio-queue.
            let at = self.gpa.checked_add(u64::from(index) * DESC_SIZE)?;
            return self.mem.read_obj::<Descriptor>(GuestAddress(at)).ok();
        }
        // Volatile: the guest may write the table concurrently; values are validated after.
        // SAFETY: `table` holds `size` descriptors in one mapped region (`host_range`), index < size.
        let (lo, hi) = unsafe {
            let p = self.table.add(usize::from(index) * DESC_SIZE as usize);
            if p as usize % 8 == 0 {
                // Main tables are 16-aligned (virtio-queue checks); indirect ones usually are.
                let q = p.cast::<u64>();
                (
                    std::ptr::read_volatile(q),
                    std::ptr::read_volatile(q.add(1)),
                )
            } else {
                let mut b = [0u8; 16];
                for (i, x) in b.iter_mut().enumerate() {
                    *x = std::ptr::read_volatile(p.add(i));
                }
                (
                    u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
                    u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")),
                )
            }
        };
        let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
        Some(Descriptor::new(
            lo,
            hi as u32,
            (hi >> 32) as u16,
            (hi >> 48) as u16,
        ))
    }
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let d = self.read(self.next)?;
            if d.flags() & F_INDIRECT != 0 {
                if self.indirect || d.len() % DESC_SIZE as u32 != 0 {
                    return None;
                }
                let entries = u16::try_from(d.len() / DESC_SIZE as u32).ok()?;
                self.table = host_range(self.mem, d.addr().0, u64::from(d.len()))
                    .unwrap_or(std::ptr::null_mut());
                self.gpa = d.addr().0;
                self.size = entries;
                self.next = 0;
                self.ttl = entries;
                self.indirect = true;
                continue;
            }
            self.yielded = self.yielded.checked_add(d.len())?;
            if d.flags() & F_NEXT != 0 {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}
