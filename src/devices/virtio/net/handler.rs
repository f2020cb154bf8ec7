//! What the RX, TX and control queue handlers share: the queue and its notifications, the
//! used-ring publish with EVENT_IDX, rate-limited logging of bad chains, and the drain
//! protocol for reads that only complete when a packet arrives.
//!
//! **Drain.** A posted tap read has no natural end, but the reactor frees a draining queue
//! only once [`QueueHandler::in_flight`](crate::reactor::QueueHandler::in_flight) is 0 and
//! never tells the handler it is draining. So each RX handler keeps a POLL_ADD on a private
//! "stop" eventfd in flight. The eventfd is written by the device at reset and by the
//! handler itself the first time the reactor asks `in_flight()` (it only asks for a draining
//! queue); the poll completion, which comes with a ring context, sends one
//! IORING_OP_ASYNC_CANCEL for every request on the queue's tap file. Each cancelled read
//! completes with -ECANCELED and returns its chain with length 0, so no chain is lost or
//! completed twice.

use std::cell::Cell;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::block::handler::LogLimiter;
use crate::devices::virtio::GuestMemory;
use crate::metrics::QueueMetrics;
use crate::reactor::RingCtx;

/// Tags above every descriptor head (heads are below 32768).
pub const TAG_STOP: u32 = 0xffff_0000;
pub const TAG_CANCEL: u32 = 0xffff_0001;
pub const TAG_RX_POLL: u32 = 0xffff_0002;

/// Everything a net queue needs on its reactor, moved there at activation.
pub struct NetQueueParts {
    /// `net0-rx0`, for logs.
    pub name: String,
    pub mem: GuestMemory,
    pub queue: Queue,
    pub kick: EventFd,
    pub irq: Option<EventFd>,
    /// Features the driver acknowledged.
    pub acked: u64,
    pub poll: Option<Duration>,
    pub metrics: QueueMetrics,
    /// The queue pair's tap file (registered at `fixed`), `None` for the control queue.
    pub tap_fd: Option<std::os::fd::RawFd>,
    pub fixed: u32,
    /// Written to make the handler cancel its reads (see the module docs).
    pub stop: EventFd,
}

/// Queue state common to the three handlers.
pub struct Core {
    pub p: NetQueueParts,
    pub dirty: bool,
    pub broken: bool,
    pub log: LogLimiter,
    pub last_kick: Option<Instant>,
}

impl Core {
    pub fn new(p: NetQueueParts) -> Self {
        Core {
            p,
            dirty: false,
            broken: false,
            log: LogLimiter::new(),
            last_kick: None,
        }
    }

    /// Serves `queue` from scratch (see [`RxQueue::rearm`](super::rx::RxQueue::rearm)).
    #[cfg(any(test, feature = "fuzz"))]
    pub fn rearm(&mut self, queue: Queue) {
        self.p.queue = queue;
        self.dirty = false;
        self.broken = false;
        self.last_kick = None;
    }

    /// (chains popped, used entries written) since the queue was set up.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn progress(&self) -> (u16, u16) {
        (self.p.queue.next_avail(), self.p.queue.next_used())
    }

    /// Stops serving a queue whose rings cannot be used any more. Unlike virtio-blk there is
    /// no status byte to fail; the queue goes quiet until the driver resets the device.
    pub fn fail_queue(&mut self, what: &str, now: Instant) {
        if self.log.allow(now, &self.p.name) {
            log::error!(
                "{}: {what}; the queue stops until the device is reset",
                self.p.name
            );
        }
        self.broken = true;
    }

    /// Logs a dropped chain or frame (rate-limited) and counts it.
    pub fn drop_chain(&mut self, what: std::fmt::Arguments<'_>, now: Instant) {
        self.p.metrics.counters.errors += 1;
        if self.log.allow(now, &self.p.name) {
            log::warn!("{}: dropped: {what}", self.p.name);
        }
    }

    pub fn add_used(&mut self, head: u16, len: u32, now: Instant) {
        if let Err(e) = self.p.queue.add_used(&self.p.mem, head, len) {
            self.fail_queue(&format!("cannot write the used ring: {e}"), now);
            return;
        }
        self.dirty = true;
    }

    /// False (and the queue broken) when the avail index runs more than a queue ahead.
    pub fn avail_sane(&mut self, now: Instant) -> bool {
        match self.p.queue.avail_idx(&self.p.mem, Ordering::Acquire) {
            Ok(idx) if (idx - Wrapping(self.p.queue.next_avail())).0 <= self.p.queue.size() => true,
            Ok(idx) => {
                self.fail_queue(
                    &format!(
                        "avail index {} is more than the queue size ahead of {}",
                        idx.0,
                        self.p.queue.next_avail()
                    ),
                    now,
                );
                false
            }
            Err(e) => {
                self.fail_queue(&format!("cannot read the avail index: {e}"), now);
                false
            }
        }
    }

    pub fn set_notify(&mut self, enable: bool) -> bool {
        if self.broken {
            return false;
        }
        let r = if enable {
            self.p.queue.enable_notification(&self.p.mem)
        } else {
            self.p
                .queue
                .disable_notification(&self.p.mem)
                .and_then(|()| {
                    crate::devices::virtio::suppress_kicks(&self.p.queue, &self.p.mem)
                        .map_err(virtio_queue::Error::GuestMemory)
                })
                .map(|()| false)
        };
        r.unwrap_or_else(|e| {
            self.fail_queue(
                &format!("cannot update the notification state: {e}"),
                Instant::now(),
            );
            false
        })
    }

    pub fn kicked(&mut self, now: Instant) {
        self.p.metrics.counters.kicks += 1;
        self.last_kick.get_or_insert(now);
    }

    pub fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        match self.p.queue.needs_notification(&self.p.mem) {
            Ok(true) => match &self.p.irq {
                Some(irq) => {
                    if let Err(e) = irq.write(1) {
                        log::error!("{}: cannot signal the irqfd: {e}", self.p.name);
                    }
                    self.p.metrics.counters.irqs_sent += 1;
                }
                None => self.p.metrics.counters.irqs_suppressed += 1,
            },
            Ok(false) => self.p.metrics.counters.irqs_suppressed += 1,
            Err(e) => self.fail_queue(&format!("cannot read used_event: {e}"), Instant::now()),
        }
    }
}

/// The stop side of the drain protocol (module docs).
#[derive(Default)]
pub struct Drain {
    /// The POLL_ADD on the stop eventfd is in flight.
    pub armed: bool,
    /// The stop eventfd was written by us.
    pub signalled: Cell<bool>,
    /// Stop seen: post nothing more.
    pub stopping: bool,
    /// The ASYNC_CANCEL is in flight.
    pub cancelling: bool,
}

impl Drain {
    /// Arms the stop poll once. Returns true when it queued an operation.
    pub fn arm(&mut self, ctx: &mut RingCtx<'_, '_>, stop: &EventFd, name: &str) -> bool {
        if self.armed || self.stopping {
            return false;
        }
        let e = opcode::PollAdd::new(types::Fd(stop.as_raw_fd()), libc::POLLIN as u32).build();
        // SAFETY: a poll SQE references no memory; the eventfd lives as long as the handler,
        // which the reactor keeps until this completion is reaped (it counts as in flight).
        match unsafe { ctx.push(e, TAG_STOP) } {
            Ok(()) => {
                self.armed = true;
                true
            }
            Err(e) => {
                log::error!("{name}: cannot watch the stop eventfd: {e}");
                false
            }
        }
    }

    /// Called from `in_flight()`: the reactor is draining the queue.
    pub fn signal(&self, stop: &EventFd) {
        if self.armed && !self.stopping && !self.signalled.replace(true) {
            let _ = stop.write(1);
        }
    }

    /// The stop poll completed: cancels every request on the tap file. Returns true when
    /// it queued the cancel.
    pub fn stopped(&mut self, ctx: &mut RingCtx<'_, '_>, fixed: u32, name: &str) -> bool {
        self.armed = false;
        self.stopping = true;
        let e =
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(fixed)).all()).build();
        // SAFETY: a cancel SQE references no memory.
        match unsafe { ctx.push(e, TAG_CANCEL) } {
            Ok(()) => {
                self.cancelling = true;
                true
            }
            Err(e) => {
                log::error!("{name}: cannot cancel the posted reads: {e}");
                false
            }
        }
    }
}
