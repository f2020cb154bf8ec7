//! Split virtqueue, driver side, for polling: descriptors and rings live in
//! guest RAM and are touched with volatile accesses; the only exit on the
//! data path is the notify write, and only when the device asks for it.

use crate::arch::mmio;
use crate::mem::Bump;
use core::sync::atomic::{compiler_fence, fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Size of one descriptor.
pub const DESC_SIZE: u64 = 16;

/// `vring_need_event`: has `new` moved past `event` since `old`?
#[inline(always)]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One split virtqueue.
pub struct SplitQueue {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    notify_addr: u64,
    event_idx: bool,
    /// Next avail index to fill (not yet visible to the device).
    avail_idx: u16,
    /// Avail index last published.
    published: u16,
    /// Next used index to consume.
    last_used: u16,
    /// Notify writes issued.
    pub kicks: u64,
}

impl SplitQueue {
    /// Allocates zeroed rings for `size` entries (a power of two).
    pub fn alloc(bump: &mut Bump, index: u16, size: u16, event_idx: bool) -> Option<Self> {
        let n = u64::from(size);
        let desc = bump.alloc(DESC_SIZE * n, 4096)?;
        let avail = bump.alloc(6 + 2 * n, 4096)?;
        let used = bump.alloc(6 + 8 * n, 4096)?;
        let q = SplitQueue {
            index,
            size,
            desc,
            avail,
            used,
            notify_addr: 0,
            event_idx,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            kicks: 0,
        };
        // We poll: ask the device not to interrupt. With EVENT_IDX, used_event
        // sits just behind the used index so it is 65535 completions away.
        if event_idx {
            q.set_used_event(0xffff);
        } else {
            mmio::write16(avail + 0, AVAIL_F_NO_INTERRUPT);
        }
        Some(q)
    }

    /// Zeroes the rings and starts the indices over (after a device reset), keeping
    /// the same memory.
    pub fn reset_rings(&mut self) {
        let n = u64::from(self.size);
        crate::mem::zero(self.desc, (DESC_SIZE * n) as usize);
        crate::mem::zero(self.avail, (6 + 2 * n) as usize);
        crate::mem::zero(self.used, (6 + 8 * n) as usize);
        (self.avail_idx, self.published, self.last_used, self.kicks) = (0, 0, 0, 0);
        if self.event_idx {
            self.set_used_event(0xffff);
        } else {
            mmio::write16(self.avail, AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Notifies the device unconditionally (for tests of the device, not the data path).
    pub fn kick(&mut self) {
        mmio::write16(self.notify_addr, self.index);
        self.kicks += 1;
    }

    /// Stores an arbitrary avail index (a hostile driver's); the queue is unusable
    /// afterwards until the device is reset.
    pub fn write_avail_idx_raw(&mut self, idx: u16) {
        compiler_fence(Ordering::SeqCst);
        mmio::write16(self.avail + 2, idx);
        fence(Ordering::SeqCst);
    }

    /// The avail index published so far.
    pub fn published(&self) -> u16 {
        self.published
    }

    pub fn set_notify_addr(&mut self, addr: u64) {
        self.notify_addr = addr;
    }

    /// Writes descriptor `i`.
    #[inline(always)]
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc_at(self.desc + DESC_SIZE * u64::from(i), addr, len, flags, next);
    }

    /// Adds a chain head to the avail ring (not yet visible).
    #[inline(always)]
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx & (self.size - 1));
        mmio::write16(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes pushed heads and notifies the device if it asked for it.
    #[inline(always)]
    pub fn publish(&mut self) {
        if self.avail_idx == self.published {
            return;
        }
        // Ring entries and descriptors before the index (x86 keeps stores in order).
        compiler_fence(Ordering::SeqCst);
        mmio::write16(self.avail + 2, self.avail_idx);
        // The index store before the event/flags load (store→load needs mfence).
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let avail_event = mmio::read16(self.used + 4 + 8 * u64::from(self.size));
            need_event(avail_event, self.avail_idx, self.published)
        } else {
            mmio::read16(self.used) & USED_F_NO_NOTIFY == 0
        };
        self.published = self.avail_idx;
        if kick {
            mmio::write16(self.notify_addr, self.index);
            self.kicks += 1;
        }
    }

    /// Takes the next used element `(id, len)`, if any.
    #[inline(always)]
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let used_idx = mmio::read16(self.used + 2);
        if used_idx == self.last_used {
            return None;
        }
        // The element (and the buffers it covers) after the index.
        compiler_fence(Ordering::SeqCst);
        let elem = self.used + 4 + 8 * u64::from(self.last_used & (self.size - 1));
        let id = mmio::read32(elem);
        let len = mmio::read32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Keeps interrupts suppressed after consuming used entries.
    #[inline(always)]
    pub fn suppress_interrupts(&self) {
        if self.event_idx {
            self.set_used_event(self.last_used.wrapping_sub(1));
        }
    }

    /// Asks the device to interrupt for the next used entry (used_event = the next index
    /// to consume, or AVAIL_F_NO_INTERRUPT cleared), then reads the used index once:
    /// entries published before the request took effect raise no interrupt, so `true`
    /// (entries waiting) means the caller must consume them itself (as Linux's
    /// `virtqueue_enable_cb` does).
    #[inline(always)]
    pub fn arm_interrupt(&self) -> bool {
        if self.event_idx {
            self.set_used_event(self.last_used);
        } else {
            mmio::write16(self.avail, 0);
        }
        // The used_event/flags store before the used index load.
        fence(Ordering::SeqCst);
        mmio::read16(self.used + 2) != self.last_used
    }

    /// Used entries published and not consumed yet (for diagnosing a lost interrupt).
    pub fn used_pending(&self) -> u16 {
        mmio::read16(self.used + 2).wrapping_sub(self.last_used)
    }

    fn set_used_event(&self, v: u16) {
        mmio::write16(self.avail + 4 + 2 * u64::from(self.size), v);
    }
}

/// Writes one descriptor at `at` (a ring slot or an indirect table entry).
#[inline(always)]
pub fn write_desc_at(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: `at` is a 16-byte descriptor slot in memory this driver allocated.
    unsafe {
        core::ptr::write_volatile(at as *mut u64, addr);
    }
    mmio::write32(at + 8, len);
    mmio::write16(at + 12, flags);
    mmio::write16(at + 14, next);
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn test_need_event_kicks_only_when_event_index_crossed() {
        // Device asked for a kick when avail idx passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(10, 8, 5));
        // Wrap-around.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(!need_event(2, 1, 0xfffe));
    }
}
