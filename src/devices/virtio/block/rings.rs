//! Host-pointer access to a split virtqueue's avail and used rings (virtio 1.2, 2.7.6-2.7.8).
//!
//! virtio-queue's `Queue` goes through a guest-memory lookup for every ring access; on the
//! data path that dominated the per-request cost. The ring addresses are fixed while a queue
//! is active and guest memory stays mapped, so [`Rings`] checks them once, then reads avail
//! entries and writes used entries through raw pointers, and publishes the used index once
//! per batch. `Queue` stays the source of the configuration and does the (per-pass)
//! notification enabling.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};

use super::request::host_range;
use crate::devices::virtio::GuestMemory;

/// `VRING_AVAIL_F_NO_INTERRUPT`: without EVENT_IDX, the driver asks for no interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The rings of one active queue.
pub struct Rings {
    size: u16,
    /// flags, idx, ring[size], used_event.
    avail: *mut u8,
    /// flags, idx, ring[size] of (id, len), avail_event.
    used: *mut u8,
    event_idx: bool,
    next_used: u16,
    published: u16,
    /// `next_used` when the last interrupt decision was taken.
    signalled: u16,
}

impl Rings {
    /// Checks that both rings lie inside guest memory and are aligned; `None` if not.
    pub fn new(mem: &GuestMemory, q: &Queue) -> Option<Rings> {
        let size = q.size();
        if size == 0 || q.avail_ring() % 2 != 0 || q.used_ring() % 4 != 0 {
            return None;
        }
        let avail = host_range(mem, q.avail_ring(), 6 + 2 * u64::from(size))?;
        let used = host_range(mem, q.used_ring(), 6 + 8 * u64::from(size))?;
        Some(Rings {
            size,
            avail,
            used,
            event_idx: q.event_idx_enabled(),
            next_used: q.next_used(),
            published: q.next_used(),
            signalled: q.next_used(),
        })
    }

    /// `base + off` as an atomic u16. `off` must be even and inside the ring (callers pass
    /// offsets derived from `size`, as checked in `new`).
    fn at(base: *mut u8, off: usize) -> &'static AtomicU16 {
        // The handler holds the memory, so the mapping outlives the queue; the reference is
        // used immediately and never stored.
        // SAFETY: `base` is a 2-aligned ring in mapped guest memory (`new`), `off` even and inside.
        unsafe { AtomicU16::from_ptr(base.add(off).cast()) }
    }

    /// The driver's avail index (Acquire: the ring entries before it are visible).
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(Self::at(self.avail, 2).load(Ordering::Acquire))
    }

    /// The head in avail slot `pos % size`.
    pub fn avail_head(&self, pos: u16) -> u16 {
        let off = 4 + 2 * usize::from(pos % self.size);
        u16::from_le(Self::at(self.avail, off).load(Ordering::Relaxed))
    }

    /// Writes a used element; the driver sees it at the next [`publish`](Self::publish).
    pub fn push_used(&mut self, head: u16, len: u32) {
        debug_assert!(
            head < self.size,
            "used entry for head {head} beyond the queue"
        );
        let off = 4 + 8 * usize::from(self.next_used % self.size);
        let mut e = [0u8; 8];
        e[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        for (i, b) in e.iter().enumerate() {
            // SAFETY: `off + 8 <= 4 + 8 * size`, inside the used ring checked in `new`.
            unsafe { std::ptr::write_volatile(self.used.add(off + i), *b) };
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Stores the used index if elements were added since the last call. Returns the new
    /// index, or `None` when there was nothing to publish.
    pub fn publish(&mut self) -> Option<u16> {
        if self.next_used == self.published {
            return None;
        }
        // Release: the elements are visible before the index that covers them.
        Self::at(self.used, 2).store(self.next_used.to_le(), Ordering::Release);
        self.published = self.next_used;
        Some(self.next_used)
    }

    /// Whether the driver wants an interrupt for the entries published since the last call
    /// (virtio 1.2, 2.7.10: `used_event`, or `VRING_AVAIL_F_NO_INTERRUPT` without EVENT_IDX).
    pub fn needs_notification(&mut self) -> bool {
        // The used index store must be visible before reading the driver's wishes.
        fence(Ordering::SeqCst);
        let new = self.published;
        let old = std::mem::replace(&mut self.signalled, new);
        if !self.event_idx {
            let flags = u16::from_le(Self::at(self.avail, 0).load(Ordering::Relaxed));
            return flags & AVAIL_F_NO_INTERRUPT == 0;
        }
        let off = 4 + 2 * usize::from(self.size);
        let used_event = u16::from_le(Self::at(self.avail, off).load(Ordering::Relaxed));
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    pub fn next_used(&self) -> u16 {
        self.next_used
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::block::driver::TestDriver;

    fn setup(event_idx: bool) -> (GuestMemory, TestDriver, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let d = TestDriver::new(&mem, GuestAddress(0x1000), 8, 1 << 20);
        let q = d.queue(event_idx);
        (mem, d, q)
    }

    #[test]
    fn test_rings_outside_memory_or_misaligned_rejected() {
        let (mem, _d, mut q) = setup(false);
        q.set_used_ring_address(Some(0xffff_0000), Some(0));
        assert!(Rings::new(&mem, &q).is_none());
    }

    #[test]
    fn test_push_publish_visible_to_driver_only_after_publish() {
        let (mem, mut d, q) = setup(false);
        let mut r = Rings::new(&mem, &q).unwrap();
        r.push_used(3, 17);
        assert_eq!(d.used_idx(), 0);
        assert_eq!(r.publish(), Some(1));
        assert_eq!(r.publish(), None);
        assert_eq!(d.take_used(), vec![(3, 17)]);
        let _ = mem;
    }

    #[test]
    fn test_no_interrupt_flag_without_event_idx_suppresses() {
        let (mem, d, q) = setup(false);
        let mut r = Rings::new(&mem, &q).unwrap();
        r.push_used(0, 1);
        r.publish();
        assert!(r.needs_notification());
        mem.write_obj(AVAIL_F_NO_INTERRUPT, d.avail).unwrap();
        r.push_used(1, 1);
        r.publish();
        assert!(!r.needs_notification());
    }

    #[test]
    fn test_event_idx_decisions_match_virtio_queue_over_wraparound() {
        let (mem, d, mut q) = setup(true);
        let mut r = Rings::new(&mem, &q).unwrap();
        let mut x = 0x1234_5678_9abc_def1u64;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let batch = (x % 5) as u16;
            for _ in 0..batch {
                let head = (x >> 8) as u16 % 8;
                q.add_used(&mem, head, 1).unwrap();
                r.push_used(head, 1);
            }
            if x >> 20 & 3 == 0 {
                // The driver moves used_event somewhere near the used index.
                d.set_used_event(r.next_used().wrapping_sub((x >> 24) as u16 % 6));
            }
            r.publish();
            let a = q.needs_notification(&mem).unwrap();
            let b = r.needs_notification();
            assert_eq!(a, b, "step {step}");
        }
    }
}
