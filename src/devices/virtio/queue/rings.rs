//! Host-pointer access to a split virtqueue's avail and used rings (virtio 1.2, 2.7.6-2.7.8).
//!
//! virtio-queue's `Queue` goes through a guest-memory lookup for every ring access; on the
//! data path that dominated the per-request cost. The ring addresses are fixed while a queue
//! is active and guest memory stays mapped, so [`Rings`] checks them once, then reads avail
//! entries and writes used entries through raw pointers; the used index is stored once per
//! batch or after every entry ([`UsedIndex`]), the interrupt decided once per batch. The notification state (used flags or
//! `avail_event`) is written the same way. `Queue` stays the source of the configuration
//! (addresses, size, EVENT_IDX).

use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};

use super::host_range;
use super::UsedIndex;
use crate::devices::virtio::GuestMemory;

/// `VRING_AVAIL_F_NO_INTERRUPT`: without EVENT_IDX, the driver asks for no interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`: without EVENT_IDX, the device asks for no kicks.
const USED_F_NO_NOTIFY: u16 = 1;

/// The rings of one active queue.
pub struct Rings {
    size: u16,
    /// flags, idx, ring[size], used_event.
    avail: *mut u8,
    /// flags, idx, ring[size] of (id, len), avail_event.
    used: *mut u8,
    event_idx: bool,
    used_index: UsedIndex,
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
            used_index: UsedIndex::PerBatch,
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

    /// When the driver sees the used index move (once per batch until set).
    pub fn set_used_index(&mut self, when: UsedIndex) {
        self.used_index = when;
    }

    /// Writes a used element; the driver sees it at once with [`UsedIndex::PerEntry`], else
    /// at the next [`publish`](Self::publish).
    pub fn push_used(&mut self, head: u16, len: u32) {
        self.write_used(head, len);
        if self.used_index == UsedIndex::PerEntry {
            self.store_used_idx();
        }
    }

    /// Writes several used elements that the driver must see together (one received frame
    /// over several MRG_RXBUF buffers, virtio 1.2, 5.1.6.4): with [`UsedIndex::PerEntry`]
    /// the index is stored once, after the last of them.
    pub fn push_used_all(&mut self, entries: impl IntoIterator<Item = (u16, u32)>) {
        let before = self.next_used;
        for (head, len) in entries {
            self.write_used(head, len);
        }
        if self.used_index == UsedIndex::PerEntry && self.next_used != before {
            self.store_used_idx();
        }
    }

    /// Writes the used element at `next_used` and moves past it; the index is not stored.
    fn write_used(&mut self, head: u16, len: u32) {
        debug_assert!(
            head < self.size,
            "used entry for head {head} beyond the queue"
        );
        let off = 4 + 8 * usize::from(self.next_used % self.size);
        // SAFETY: `off + 8 <= 4 + 8 * size`, inside the used ring checked in `new`, which is
        // 4-aligned, as `off` is.
        unsafe {
            let e = self.used.add(off).cast::<u32>();
            std::ptr::write_volatile(e, u32::from(head).to_le());
            std::ptr::write_volatile(e.add(1), len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Release: the elements are visible before the index that covers them.
    fn store_used_idx(&self) {
        Self::at(self.used, 2).store(self.next_used.to_le(), Ordering::Release);
    }

    /// Ends a batch: stores the used index (once per batch) and returns it if elements were
    /// added since the last call (then ask [`needs_notification`](Self::needs_notification)),
    /// `None` when there were none.
    pub fn publish(&mut self) -> Option<u16> {
        if self.next_used == self.published {
            return None;
        }
        if self.used_index == UsedIndex::PerBatch {
            self.store_used_idx();
        }
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

    /// Asks the driver for kicks again (virtio 1.2, 2.7.10): `avail_event = next_avail` with
    /// EVENT_IDX, else the used ring's NO_NOTIFY flag cleared. Returns true when the driver
    /// made chains available past `next_avail` meanwhile (the caller must pop again, as no
    /// kick will come for them).
    pub fn enable_notification(&mut self, next_avail: u16) -> bool {
        if self.event_idx {
            let off = 4 + 8 * usize::from(self.size);
            Self::at(self.used, off).store(next_avail.to_le(), Ordering::Relaxed);
        } else {
            Self::at(self.used, 0).store(0, Ordering::Relaxed);
        }
        // The store must be visible before the avail index is read again, or a chain made
        // available in between would get no kick and no pop.
        fence(Ordering::SeqCst);
        u16::from_le(Self::at(self.avail, 2).load(Ordering::Relaxed)) != next_avail
    }

    /// Asks the driver for no kicks: the NO_NOTIFY flag without EVENT_IDX; with EVENT_IDX
    /// `avail_event` one behind `next_avail`, so no index the driver publishes crosses it
    /// until the ring wraps (leaving it where the last enable put it would cost one more kick,
    /// a VM exit, per request while a reactor turns notifications on around its waits).
    pub fn disable_notification(&mut self, next_avail: u16) {
        if self.event_idx {
            let off = 4 + 8 * usize::from(self.size);
            let event = next_avail.wrapping_sub(1);
            Self::at(self.used, off).store(event.to_le(), Ordering::Release);
        } else {
            Self::at(self.used, 0).store(USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        }
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
    fn test_push_used_per_batch_visible_to_driver_only_after_publish() {
        let (mem, mut d, q) = setup(false);
        let mut r = Rings::new(&mem, &q).unwrap();
        r.push_used(3, 17);
        r.push_used(5, 0xdead_beef);
        assert_eq!(d.used_idx(), 0);
        assert_eq!(r.publish(), Some(2));
        assert_eq!(r.publish(), None);
        assert_eq!(d.take_used(), vec![(3, 17), (5, 0xdead_beef)]);
        let _ = mem;
    }

    #[test]
    fn test_push_used_per_entry_visible_at_once_publish_ends_the_batch() {
        let (mem, mut d, q) = setup(false);
        let mut r = Rings::new(&mem, &q).unwrap();
        r.set_used_index(UsedIndex::PerEntry);
        r.push_used(3, 17);
        assert_eq!(d.used_idx(), 1);
        r.push_used(5, 0xdead_beef);
        assert_eq!(d.take_used(), vec![(3, 17), (5, 0xdead_beef)]);
        assert_eq!(r.publish(), Some(2));
        assert_eq!(r.publish(), None);
        let _ = mem;
    }

    #[test]
    fn test_push_used_all_per_entry_stores_index_once_after_the_group() {
        let (mem, mut d, q) = setup(false);
        let mut r = Rings::new(&mem, &q).unwrap();
        r.set_used_index(UsedIndex::PerEntry);
        r.push_used(1, 5);
        assert_eq!(d.used_idx(), 1);
        r.push_used_all([(2, 100), (4, 200), (6, 7)]);
        assert_eq!(d.used_idx(), 4);
        r.push_used_all([]);
        assert_eq!(d.used_idx(), 4);
        assert_eq!(d.take_used(), vec![(1, 5), (2, 100), (4, 200), (6, 7)]);
        assert_eq!(r.publish(), Some(4));
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

    /// The device-written notification state: used flags and avail_event.
    fn notify_state(mem: &GuestMemory, d: &TestDriver) -> (u16, u16) {
        let event = GuestAddress(d.used.0 + 4 + 8 * u64::from(d.size));
        (mem.read_obj(d.used).unwrap(), mem.read_obj(event).unwrap())
    }

    #[test]
    fn test_notification_state_matches_virtio_queue() {
        for event_idx in [false, true] {
            let (mem, mut d, mut q) = setup(event_idx);
            let mut r = Rings::new(&mem, &q).unwrap();
            for (step, next_avail) in [0u16, 3, 0xffff, 2].into_iter().enumerate() {
                q.set_next_avail(next_avail);
                let want = q.enable_notification(&mem).unwrap();
                let used_after_queue = notify_state(&mem, &d);
                assert_eq!(r.enable_notification(next_avail), want, "step {step}");
                assert_eq!(notify_state(&mem, &d), used_after_queue, "step {step}");
                q.disable_notification(&mem).unwrap();
                let (flags, event) = notify_state(&mem, &d);
                r.disable_notification(next_avail);
                // With EVENT_IDX, avail_event goes one behind (virtio-queue leaves it).
                let event = if event_idx {
                    next_avail.wrapping_sub(1)
                } else {
                    event
                };
                assert_eq!(notify_state(&mem, &d), (flags, event), "step {step}");
                d.publish(0);
            }
        }
    }

    #[test]
    fn test_disable_with_event_idx_driver_does_not_kick_until_enabled_again() {
        let (mem, d, q) = setup(true);
        let mut r = Rings::new(&mem, &q).unwrap();
        // The driver's side of EVENT_IDX (virtio 1.2, 2.7.10): does publishing old..new kick?
        let kicks = |old: u16, new: u16| {
            let (_, event) = notify_state(&mem, &d);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        let next = 0xfffeu16;
        r.enable_notification(next);
        assert!(kicks(next, next.wrapping_add(1)));
        r.disable_notification(next);
        for n in 1..100u16 {
            assert!(!kicks(next, next.wrapping_add(n)), "{n}");
        }
        r.enable_notification(next);
        assert!(kicks(next, next.wrapping_add(1)));
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
