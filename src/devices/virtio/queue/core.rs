//! [`QueueCore`]: the state and rules every virtqueue has whatever its device. It owns the
//! queue's rings ([`Rings`]), its notification state, the kick and irq eventfds, the broken
//! flag (DEVICE_NEEDS_RESET), the log limiter and the metrics; a device's handler asks it for
//! available heads and their chains, hands used entries back and never touches the rings.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use super::chain::Chain;
use super::log::LogLimiter;
use super::rings::Rings;
use super::UsedIndex;
use crate::devices::virtio::GuestMemory;
use crate::metrics::QueueRecorder;

/// Everything a queue needs on its reactor, whatever the device, moved there at activation.
pub struct QueueParts {
    /// `blk0-q1`, `net0-rx0`: for logs.
    pub name: String,
    pub mem: GuestMemory,
    /// Ring addresses, size and EVENT_IDX as the driver configured them.
    pub queue: Queue,
    /// The ioeventfd the guest kicks.
    pub kick: EventFd,
    /// The irqfd of the queue's MSI-X vector; `None` when the driver chose NO_VECTOR.
    pub irq: Option<EventFd>,
    /// The device's DEVICE_NEEDS_RESET, set when this queue breaks.
    pub needs_reset: Arc<AtomicBool>,
    /// The busy-poll window's maximum (`poll-us`), `None`: never poll.
    pub poll: Option<Duration>,
    pub metrics: QueueRecorder,
    /// Receives the queue's next avail index when the queue is dropped (after its drain):
    /// vhost-user's GET_VRING_BASE answers with it.
    pub final_avail: Option<Arc<AtomicU32>>,
}

/// The device-independent half of a queue served by a reactor.
pub struct QueueCore {
    p: QueueParts,
    /// `None` when the rings are not inside guest memory (the queue is then broken).
    rings: Option<Rings>,
    /// The next avail ring position to pop.
    next_avail: u16,
    /// The avail index read by the last [`avail`](Self::avail): pops stop there.
    avail_end: u16,
    /// Used entries were written since the last publish.
    dirty: bool,
    broken: bool,
    log: LogLimiter,
    /// The first kick not yet answered by a pop.
    last_kick: Option<Instant>,
    used_index: UsedIndex,
}

impl QueueParts {
    /// The number of descriptor heads the driver configured.
    pub fn queue_size(&self) -> usize {
        usize::from(self.queue.size())
    }
}

impl QueueCore {
    /// Checks the rings once (the queue is broken when they are misaligned or outside guest
    /// memory); call on the reactor thread.
    pub fn new(p: QueueParts) -> Self {
        let rings = Rings::new(&p.mem, &p.queue);
        let next_avail = p.queue.next_avail();
        let mut core = QueueCore {
            p,
            rings: None,
            next_avail,
            avail_end: next_avail,
            dirty: false,
            broken: false,
            log: LogLimiter::new(),
            last_kick: None,
            used_index: UsedIndex::PerBatch,
        };
        core.set_rings(rings);
        core
    }

    /// When the driver sees the used index move (once per batch unless set).
    pub fn with_used_index(mut self, when: UsedIndex) -> Self {
        self.used_index = when;
        if let Some(r) = self.rings.as_mut() {
            r.set_used_index(when);
        }
        self
    }

    fn set_rings(&mut self, rings: Option<Rings>) {
        self.rings = rings;
        if let Some(r) = self.rings.as_mut() {
            r.set_used_index(self.used_index);
        }
        if self.rings.is_none() {
            self.fail(
                "the rings are misaligned or outside guest memory",
                Instant::now(),
            );
        }
    }

    /// Serves `queue` as a freshly attached queue would, keeping every allocation: the fuzz
    /// harnesses run millions of queues through one handler.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn rearm(&mut self, queue: Queue) {
        self.next_avail = queue.next_avail();
        self.avail_end = self.next_avail;
        self.p.queue = queue;
        self.dirty = false;
        self.broken = false;
        self.last_kick = None;
        self.p.needs_reset.store(false, Ordering::Release);
        self.set_rings(Rings::new(&self.p.mem, &self.p.queue));
    }

    /// (chains popped, used entries written) since the queue was set up.
    pub fn progress(&self) -> (u16, u16) {
        let used = self.rings.as_ref().map_or(0, Rings::next_used);
        (self.next_avail, used)
    }

    /// The queue stopped serving until the device is reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// `blk0-q1`, `net0-rx0`.
    pub fn name(&self) -> &str {
        &self.p.name
    }

    /// The guest memory the queue's buffers lie in.
    pub fn mem(&self) -> &GuestMemory {
        &self.p.mem
    }

    pub fn metrics(&self) -> &QueueRecorder {
        &self.p.metrics
    }

    pub fn metrics_mut(&mut self) -> &mut QueueRecorder {
        &mut self.p.metrics
    }

    pub fn kick_fd(&self) -> RawFd {
        self.p.kick.as_raw_fd()
    }

    /// Writes the queue's own kick eventfd: the reactor pops it as if the guest had kicked
    /// (for chains made available while notifications were off and no pass will look).
    pub fn self_kick(&self) {
        // A full eventfd counter already means a pending kick.
        let _ = self.p.kick.write(1);
    }

    pub fn poll_window(&self) -> Option<Duration> {
        self.p.poll
    }

    /// Stops serving the queue until the device is reset, and tells the driver
    /// (DEVICE_NEEDS_RESET): the rings are corrupt or a chain cannot be answered.
    pub fn fail(&mut self, what: &str, now: Instant) {
        if self.log.allow(now, &self.p.name) {
            log::error!("{}: {what}; the device needs a reset", self.p.name);
        }
        self.broken = true;
        self.p.needs_reset.store(true, Ordering::Release);
    }

    /// True when a line about bad guest input may be logged now (rate-limited per queue).
    pub fn may_log(&mut self, now: Instant) -> bool {
        self.log.allow(now, &self.p.name)
    }

    /// Counts a kick; the first one not yet answered is when the requests it announced began
    /// waiting.
    pub fn kicked(&mut self, now: Instant) {
        self.p.metrics.counters.kicks += 1;
        self.last_kick.get_or_insert(now);
    }

    /// When the requests a pass pops began waiting: the first unanswered kick, else `now` (a
    /// poll found them).
    pub fn take_kick(&mut self, now: Instant) -> Instant {
        self.last_kick.take().unwrap_or(now)
    }

    pub fn poll_hit(&mut self) {
        self.p.metrics.counters.poll_hits += 1;
    }

    /// Enables (`true`) or disables guest notifications; on enable, true when chains arrived
    /// meanwhile (pop again instead of sleeping). A broken queue wants nothing.
    pub fn set_notify(&mut self, enable: bool) -> bool {
        let Some(rings) = self.rings.as_mut().filter(|_| !self.broken) else {
            return false;
        };
        if enable {
            rings.enable_notification(self.next_avail)
        } else {
            rings.disable_notification(self.next_avail);
            false
        }
    }

    /// Reads the avail index once and returns how many chains wait. A driver whose index runs
    /// more than a queue ahead of the device's has corrupted the ring: the queue breaks and
    /// 0 is returned (virtio-queue would log without limit and yield nothing on every pass).
    pub fn avail(&mut self, now: Instant) -> u16 {
        let Some(rings) = self.rings.as_ref().filter(|_| !self.broken) else {
            return 0;
        };
        let idx = rings.avail_idx();
        let waiting = idx.wrapping_sub(self.next_avail);
        if waiting > self.p.queue.size() {
            self.fail(
                &format!(
                    "avail index {idx} is more than the queue size ahead of {}",
                    self.next_avail
                ),
                now,
            );
            return 0;
        }
        self.avail_end = idx;
        waiting
    }

    /// Pops the next head below the index the last [`avail`](Self::avail) read. A head beyond
    /// the queue, or one the device still has in flight (`busy(head)`: the driver made it
    /// available twice, so its buffers may be in use and the chain cannot be answered),
    /// breaks the queue and is not popped.
    pub fn pop(&mut self, now: Instant, busy: impl Fn(usize) -> bool) -> Option<u16> {
        if self.next_avail == self.avail_end || self.broken {
            return None;
        }
        let head = self.rings.as_ref()?.avail_head(self.next_avail);
        if head >= self.p.queue.size() || busy(usize::from(head)) {
            self.fail(
                &format!("descriptor head {head} is out of range or already in flight"),
                now,
            );
            return None;
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Some(head)
    }

    /// The descriptors of the chain at `head`, read through host pointers.
    pub fn chain(&self, head: u16) -> Chain<'_> {
        let table = GuestAddress(self.p.queue.desc_table());
        Chain::new(&self.p.mem, table, self.p.queue.size(), head)
    }

    /// Gives `head` back to the driver with `len` bytes written; the driver sees it at once
    /// or at the next [`publish`](Self::publish) ([`UsedIndex`]).
    pub fn push_used(&mut self, head: u16, len: u32) {
        if let Some(rings) = self.rings.as_mut() {
            rings.push_used(head, len);
            self.dirty = true;
        }
    }

    /// Gives several heads back that the driver must see together (one frame over several
    /// MRG_RXBUF buffers): with [`UsedIndex::PerEntry`] the index moves once, past all of
    /// them.
    pub fn push_used_all(&mut self, entries: impl IntoIterator<Item = (u16, u32)>) {
        if let Some(rings) = self.rings.as_mut() {
            rings.push_used_all(entries);
            self.dirty = true;
        }
    }

    /// Publishes the used entries added since the last call (one index store, unless stored
    /// per entry) and writes the irqfd once when the driver wants an interrupt (EVENT_IDX, or NO_INTERRUPT without it)
    /// and the queue has a vector.
    pub fn publish(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let Some(rings) = self.rings.as_mut() else {
            return;
        };
        let Some(idx) = rings.publish() else {
            return;
        };
        self.p.queue.set_next_used(idx);
        let counters = &mut self.p.metrics.counters;
        if !rings.needs_notification() {
            counters.irqs_suppressed += 1;
            return;
        }
        match &self.p.irq {
            Some(irq) => {
                if let Err(e) = irq.write(1) {
                    log::error!("{}: cannot signal the irqfd: {e}", self.p.name);
                }
                counters.irqs_sent += 1;
            }
            // No vector: the driver polls the used ring.
            None => counters.irqs_suppressed += 1,
        }
    }

    /// Host ranges of guest memory, for the reactor's fixed-buffer table.
    pub fn guest_regions(&self) -> Vec<(*mut u8, usize)> {
        self.p
            .mem
            .iter()
            .filter_map(|r| {
                let len = usize::try_from(r.len()).ok()?;
                let start = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((start, len))
            })
            .collect()
    }
}

impl Drop for QueueCore {
    /// The reactor drops a queue once it drained: nothing is in flight, so the next avail
    /// index is where a restarted queue must resume.
    fn drop(&mut self) {
        if let Some(at) = &self.p.final_avail {
            at.store(u32::from(self.next_avail), Ordering::Release);
        }
    }
}
