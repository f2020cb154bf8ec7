//! What the RX, TX and control queues of a net device share beyond the queue core
//! ([`crate::devices::virtio::queue`]): their parts (tap file, acknowledged features, the
//! stop eventfd), a rate-limited drop counter, and the drain protocol for reads that only
//! complete when a packet arrives.
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
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use io_uring::{opcode, types};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::queue::{QueueCore, QueueParts};
use crate::reactor::RingCtx;

/// Tags above every descriptor head (heads are below 32768).
pub const TAG_STOP: u32 = 0xffff_0000;
pub const TAG_CANCEL: u32 = 0xffff_0001;
pub const TAG_RX_POLL: u32 = 0xffff_0002;

/// Everything a net queue needs on its reactor, moved there at activation.
pub struct NetQueueParts {
    /// What every queue has (`net0-rx0` as its name).
    pub queue: QueueParts,
    /// Features the driver acknowledged.
    pub acked: u64,
    /// The queue pair's tap file (registered at `fixed`), `None` for the control queue.
    pub tap_fd: Option<RawFd>,
    pub fixed: u32,
    /// Written to make the handler cancel its reads (see the module docs).
    pub stop: EventFd,
}

/// Counts a dropped chain or frame in the `errors` column and logs it (rate-limited).
pub fn drop_chain(core: &mut QueueCore, what: std::fmt::Arguments<'_>, now: Instant) {
    core.metrics_mut().counters.errors += 1;
    if core.may_log(now) {
        log::warn!("{}: dropped: {what}", core.name());
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
