//! The queue core every virtio device's queues share (block and net alike).
//!
//! A queue served by a reactor is a [`Virtqueue`]: a [`QueueCore`] (rings through host
//! pointers, notification state, publish + irqfd, the broken flag and DEVICE_NEEDS_RESET,
//! the avail-index sanity check, the log limiter, metrics) joined with a device's
//! [`DeviceQueue`] (parse chains, queue their I/O, answer completions). `Virtqueue`
//! implements the reactor's [`QueueHandler`] once, so every device has the same shape: the
//! device code never touches a ring and the core never parses.
//!
//! One pass of the reactor over a queue, as the core sees it:
//! [`QueueCore::kicked`] → [`QueueCore::set_notify`]`(false)` → the device's
//! [`DeviceQueue::pop`]: [`QueueCore::avail`] (one avail-index read), then
//! [`QueueCore::pop`] + [`QueueCore::chain`] per chain → completions:
//! [`QueueCore::push_used`] → [`QueueCore::publish`] (one used-index store, one irqfd write
//! when EVENT_IDX says so).

mod chain;
mod core;
mod log;
mod rings;
mod slots;

pub use self::core::{QueueCore, QueueParts};
pub use chain::Chain;
pub use log::LogLimiter;
pub use rings::Rings;
pub use slots::{Slot, Slots, IOVEC_EMPTY};

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use super::GuestMemory;

/// When a driver sees the used index move, per queue (measured in perf/RESULTS.md, "Queue
/// core A/B").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsedIndex {
    /// Once per batch, when the queue publishes: a driver that polls many completions at a
    /// time pays one cache-line transfer per batch (virtio-blk: at QD32 7 % more IOPS and a
    /// 10 % lower p50 than storing it per entry).
    PerBatch,
    /// After every used entry: a driver waiting for one completion sees it without waiting
    /// for the rest of the reactor's reap (virtio-net: ping RTT 19.6 µs instead of 32 µs).
    PerEntry,
}
use crate::metrics::QueueRecorder;
use crate::reactor::{QueueHandler, RingCtx};

/// Host address of `addr..addr+len` when the range lies inside one guest memory region (the
/// common case, and far cheaper than vm-memory's slice iterators); `None` otherwise.
#[inline]
pub(crate) fn host_range(mem: &GuestMemory, addr: u64, len: u64) -> Option<*mut u8> {
    let r = mem.find_region(GuestAddress(addr))?;
    let off = addr - r.start_addr().raw_value();
    if off.checked_add(len)? > r.len() {
        return None;
    }
    r.get_host_address(MemoryRegionAddress(off)).ok()
}

/// What a device adds to a queue: turning chains into operations and completions into used
/// entries. Every method gets the queue's [`QueueCore`] to pop from and push to.
pub trait DeviceQueue {
    /// A file to register in the ring's fixed-file table (see [`QueueHandler::file_fd`]).
    fn file_fd(&self) -> Option<RawFd> {
        None
    }
    /// A second file (see [`QueueHandler::alt_file_fd`]).
    fn alt_file_fd(&self) -> Option<RawFd> {
        None
    }
    /// False for queues that never poll (see [`QueueHandler::may_poll`]).
    fn may_poll(&self) -> bool {
        true
    }
    /// The queue's I/O goes straight to guest memory through the ring (fixed buffers pay).
    fn uses_fixed_buffers(&self) -> bool {
        false
    }
    /// Enables or disables guest notifications (see [`QueueHandler::set_notify`]); a device
    /// that cannot take requests now may refuse to enable them.
    fn set_notify(&mut self, core: &mut QueueCore, enable: bool) -> bool {
        core.set_notify(enable)
    }
    /// Pops at most `budget` chains from `core` and queues their operations on `ctx`.
    /// Returns how many it popped. Not called on a broken queue.
    fn pop(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize;
    /// One of the queue's operations completed with `res`.
    fn complete(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32);
    /// Runs before every publish (a device may pop or re-enable notifications here).
    fn before_publish(&mut self, _core: &mut QueueCore) {}
    /// Operations queued or submitted and not completed yet.
    fn in_flight(&self) -> usize;
    /// Of those, the ones that complete within a service time (see
    /// [`QueueHandler::io_in_flight`]).
    fn io_in_flight(&self) -> usize {
        0
    }
    /// Forgets every request, as a freshly attached queue (fuzz harnesses). Nothing may be
    /// in flight.
    #[cfg(any(test, feature = "fuzz"))]
    fn rearm(&mut self);
}

/// A queue served by a reactor: the core and the device's half.
pub struct Virtqueue<D> {
    pub core: QueueCore,
    pub dev: D,
}

impl<D: DeviceQueue> Virtqueue<D> {
    /// Serves `queue` as a freshly attached queue would, keeping every allocation (slots,
    /// metrics): the fuzz harnesses run millions of queues through one handler.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn rearm(&mut self, queue: virtio_queue::Queue) {
        assert_eq!(self.dev.in_flight(), 0, "rearm with operations in flight");
        self.core.rearm(queue);
        self.dev.rearm();
    }
}

impl<D: DeviceQueue> QueueHandler for Virtqueue<D> {
    fn kick_fd(&self) -> RawFd {
        self.core.kick_fd()
    }

    fn file_fd(&self) -> Option<RawFd> {
        self.dev.file_fd()
    }

    fn alt_file_fd(&self) -> Option<RawFd> {
        self.dev.alt_file_fd()
    }

    fn poll_window(&self) -> Option<Duration> {
        self.core.poll_window()
    }

    fn may_poll(&self) -> bool {
        self.dev.may_poll()
    }

    fn kicked(&mut self, now: Instant) {
        self.core.kicked(now);
    }

    fn set_notify(&mut self, enable: bool) -> bool {
        self.dev.set_notify(&mut self.core, enable)
    }

    fn poll_avail(&mut self, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        if self.core.is_broken() {
            return 0;
        }
        let n = self.dev.pop(&mut self.core, ctx, budget);
        self.core.metrics_mut().record_batch(n);
        n
    }

    fn poll_hit(&mut self) {
        self.core.poll_hit();
    }

    fn complete(&mut self, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32) {
        self.dev.complete(&mut self.core, ctx, tag, res);
    }

    fn publish(&mut self) {
        self.dev.before_publish(&mut self.core);
        self.core.publish();
    }

    fn in_flight(&self) -> usize {
        self.dev.in_flight()
    }

    fn io_in_flight(&self) -> usize {
        self.dev.io_in_flight()
    }

    fn guest_memory(&self) -> Vec<(*mut u8, usize)> {
        if self.dev.uses_fixed_buffers() {
            self.core.guest_regions()
        } else {
            Vec::new()
        }
    }

    fn metrics(&self) -> &QueueRecorder {
        self.core.metrics()
    }

    fn metrics_mut(&mut self) -> &mut QueueRecorder {
        self.core.metrics_mut()
    }
}
