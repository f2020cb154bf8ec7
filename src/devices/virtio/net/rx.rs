//! The RX queue: guest buffers become `readv` SQEs on the tap that stay posted until a
//! packet arrives. One chain per read; with MRG_RXBUF the header says `num_buffers = 1`.
//!
//! At most [`RX_POSTED_MAX`] reads are posted at once: tun wakes every waiting read for
//! each packet, so the cap bounds that herd; a completed read pops and posts the next chain
//! right away. When the guest leaves the ring empty, a one-shot poll on the tap notices a
//! packet waiting without a buffer and counts it as a drop (the tap's own queue then
//! overflows and drops, which is what a full NIC ring does).

use std::os::fd::RawFd;
use std::time::Instant;

use io_uring::{opcode, types};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::frame::{self, RxBuf};
use super::handler::{drop_chain, Drain, NetQueueParts, TAG_CANCEL, TAG_RX_POLL, TAG_STOP};
use super::tap::VNET_HDR_LEN;
use crate::devices::virtio::queue::{DeviceQueue, QueueCore, Slots, UsedIndex, Virtqueue};
use crate::reactor::RingCtx;

/// Most reads posted on the tap per RX queue.
pub const RX_POSTED_MAX: usize = 64;
/// Iovecs per RX chain (Linux posts 1 or 2 descriptors per buffer; pages may straddle
/// memory regions).
pub const RX_IOV_MAX: usize = 32;

/// One RX queue served by a reactor.
pub type RxQueue = Virtqueue<RxRequests>;

/// Counters beyond [`QueueMetrics`] (the `errors` column sums them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxDrops {
    /// Chains dropped by the parser.
    pub bad_chain: u64,
    /// Frames the tap dropped because the buffer was too small.
    pub too_big: u64,
    /// Times a packet waited on the tap while the guest had no RX buffer posted.
    pub no_buffer: u64,
}

/// The buffers of one RX queue.
pub struct RxRequests {
    /// `net0-rx0`, for the drop summary when the queue goes.
    name: String,
    tap_fd: Option<RawFd>,
    fixed: u32,
    stop: EventFd,
    /// The posted reads (a slot's `popped` is when its read was posted).
    slots: Slots<RxBuf>,
    /// Operations in flight besides the reads: the stop poll, the cancel, the RX poll.
    other_in_flight: usize,
    drain: Drain,
    poll_armed: bool,
    /// Notifications must be re-enabled once a read slot is free: chains were popped in a
    /// completion (next_avail moved past avail_event) or the reactor's enable was skipped
    /// while the reads were capped.
    want_notify: bool,
    pub drops: RxDrops,
    /// One host byte behind every read's guest buffers: tun truncates a frame that does not
    /// fit and returns the bytes copied, so a read that reaches this byte was truncated.
    overflow: Box<[u8]>,
}

impl RxQueue {
    /// Builds the queue state; call on the reactor thread.
    pub fn new(p: NetQueueParts) -> Self {
        Virtqueue {
            dev: RxRequests {
                name: p.queue.name.clone(),
                tap_fd: p.tap_fd,
                fixed: p.fixed,
                stop: p.stop,
                slots: Slots::new(&p.queue, RX_IOV_MAX),
                other_in_flight: 0,
                drain: Drain::default(),
                poll_armed: false,
                want_notify: false,
                drops: RxDrops::default(),
                overflow: vec![0u8; 1].into_boxed_slice(),
            },
            core: QueueCore::new(p.queue).with_used_index(UsedIndex::PerEntry),
        }
    }

    /// Reads posted on the tap right now.
    pub fn posted(&self) -> usize {
        self.dev.slots.in_flight()
    }
}

impl RxRequests {
    fn fd(&self) -> types::Fixed {
        types::Fixed(self.fixed)
    }

    /// Queues the read of slot `head`. On failure the chain goes back to the guest empty.
    fn post(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, head: u16) {
        let slot = self.slots.get_mut(head);
        let niov = slot.req.niov;
        // parse_rx leaves the last iovec free for this.
        slot.iov[niov] = libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        };
        let e = opcode::Readv::new(types::Fixed(self.fixed), slot.iov.as_ptr(), niov as u32 + 1)
            .build();
        // SAFETY: the read fills the slot's iovecs: guest buffers and `overflow`, a boxed
        // slice that never moves, lives as long as the queue and is written only by reads.
        if let Err(e) = unsafe { self.slots.submit(ctx, head, e, ctx.now) } {
            drop_chain(core, format_args!("cannot submit a read: {e}"), ctx.now);
            core.push_used(head, 0);
        }
    }

    /// Pops chains and posts reads until the cap or the ring is empty. Returns the pops.
    fn refill(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        let now = ctx.now;
        let mut n = 0;
        if !self.drain.stopping && self.slots.in_flight() < RX_POSTED_MAX {
            core.avail(now);
        }
        while n < budget && self.slots.in_flight() < RX_POSTED_MAX && !self.drain.stopping {
            let Some(head) = core.pop(now, |h| self.slots.is_busy(h)) else {
                break;
            };
            n += 1;
            let slot = self.slots.get_mut(head);
            match frame::parse_rx(
                core.chain(head),
                core.mem(),
                &mut slot.iov[..RX_IOV_MAX - 1],
            ) {
                Ok(buf) => {
                    slot.req = buf;
                    self.post(core, ctx, head);
                }
                Err(e) => {
                    self.drops.bad_chain += 1;
                    drop_chain(core, format_args!("RX chain (head {head}): {e}"), now);
                    core.push_used(head, 0);
                }
            }
        }
        if self.slots.in_flight() == 0
            && !self.poll_armed
            && !self.drain.stopping
            && !core.is_broken()
        {
            // Nothing to read into: notice packets that arrive anyway.
            let e = opcode::PollAdd::new(self.fd(), libc::POLLIN as u32).build();
            // SAFETY: a poll SQE references no memory.
            if unsafe { ctx.push(e, TAG_RX_POLL) }.is_ok() {
                self.poll_armed = true;
                self.other_in_flight += 1;
            }
        }
        n
    }

    fn too_big(&mut self, core: &mut QueueCore, len: u32, head: u16, now: Instant) {
        self.drops.too_big += 1;
        let what = format_args!("RX frame larger than the {len}-byte buffer (head {head})");
        drop_chain(core, what, now);
    }

    /// A frame (or nothing) landed in the buffer of `head`: complete it, or post it again.
    fn read_done(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, head: u16, res: i32) {
        let now = ctx.now;
        let Some(slot) = self.slots.complete(u32::from(head)) else {
            log::error!("{}: completion for idle slot {head}", core.name());
            return;
        };
        let (buf, posted) = (slot.req, slot.popped);
        if res > 0 && res as u32 > buf.len {
            // The read reached the overflow byte: tun truncated the frame. The buffer is
            // still the guest's to fill.
            self.too_big(core, buf.len, head, now);
            if self.drain.stopping {
                core.push_used(head, 0);
            } else {
                self.post(core, ctx, head);
            }
            return;
        }
        if res >= 0 && res < VNET_HDR_LEN as i32 {
            drop_chain(
                core,
                format_args!("RX read of {res} bytes has no room for a header (head {head})"),
                now,
            );
            core.push_used(head, 0);
            return;
        }
        if res >= 0 {
            // tun skips num_buffers (it writes the 10-byte legacy header): one buffer per frame.
            for (i, at) in buf.num_buffers.iter().enumerate() {
                if core.mem().write_obj(1u16.to_le_bytes()[i], *at).is_err() {
                    core.fail("cannot write num_buffers", now);
                    return;
                }
            }
            let m = core.metrics_mut();
            m.counters.reads += 1;
            m.counters.bytes_read += (res as usize - VNET_HDR_LEN) as u64;
            m.record_service(now.saturating_duration_since(posted));
            core.push_used(head, res as u32);
            return;
        }
        match -res {
            libc::ECANCELED => core.push_used(head, 0),
            // tun consumed a frame that did not fit (EFAULT/EINVAL): the buffer is still free.
            libc::EFAULT | libc::EINVAL | libc::EMSGSIZE if !self.drain.stopping => {
                self.too_big(core, buf.len, head, now);
                self.post(core, ctx, head);
            }
            libc::EAGAIN if !self.drain.stopping => self.post(core, ctx, head),
            _ => {
                let why = std::io::Error::from_raw_os_error(-res);
                drop_chain(
                    core,
                    format_args!("RX read failed (head {head}): {why}"),
                    now,
                );
                core.push_used(head, 0);
            }
        }
    }
}

impl DeviceQueue for RxRequests {
    fn file_fd(&self) -> Option<RawFd> {
        self.tap_fd
    }

    fn set_notify(&mut self, core: &mut QueueCore, enable: bool) -> bool {
        // While the reads are capped a kick would find nothing to do; `before_publish`
        // enables notifications again once a completion freed a slot.
        if enable && self.slots.in_flight() >= RX_POSTED_MAX {
            self.want_notify = true;
            return false;
        }
        if enable {
            self.want_notify = false;
        }
        core.set_notify(enable)
    }

    fn pop(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        // RX buffers wait for frames, not for the device: kick-to-complete means nothing here.
        core.take_kick(ctx.now);
        if self.drain.arm(ctx, &self.stop, core.name()) {
            self.other_in_flight += 1;
        }
        if self.drain.stopping {
            return 0;
        }
        self.refill(core, ctx, budget)
    }

    fn complete(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32) {
        match tag {
            TAG_STOP => {
                self.other_in_flight -= 1;
                if self.drain.stopped(ctx, self.fixed, core.name()) {
                    self.other_in_flight += 1;
                }
            }
            TAG_CANCEL => {
                self.other_in_flight -= 1;
                self.drain.cancelling = false;
            }
            TAG_RX_POLL => {
                self.other_in_flight -= 1;
                self.poll_armed = false;
                if res > 0 && self.slots.in_flight() == 0 {
                    self.drops.no_buffer += 1;
                    drop_chain(
                        core,
                        format_args!("a packet is waiting and the guest posted no RX buffer"),
                        ctx.now,
                    );
                }
                // Re-armed only after a read was posted again: the poll is level-triggered.
            }
            _ => {
                self.read_done(core, ctx, tag as u16, res);
                if !self.drain.stopping
                    && !core.is_broken()
                    && self.refill(core, ctx, RX_POSTED_MAX) > 0
                {
                    self.want_notify = true;
                }
            }
        }
    }

    fn before_publish(&mut self, core: &mut QueueCore) {
        if self.want_notify
            && self.slots.in_flight() < RX_POSTED_MAX
            && !core.is_broken()
            && !self.drain.stopping
        {
            self.want_notify = false;
            if core.set_notify(true) {
                // Buffers arrived after the last pop and the driver will not kick for them:
                // kick ourselves (rare: only when the race is lost).
                core.self_kick();
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.drain.signal(&self.stop);
        self.slots.in_flight() + self.other_in_flight
    }

    #[cfg(any(test, feature = "fuzz"))]
    fn rearm(&mut self) {
        self.slots.clear();
        self.other_in_flight = 0;
        self.drain = Drain::default();
        self.poll_armed = false;
        self.want_notify = false;
        self.drops = RxDrops::default();
    }
}

impl Drop for RxRequests {
    /// The drop reasons behind the `errors` column, once per queue life.
    fn drop(&mut self) {
        let d = &self.drops;
        if *d != RxDrops::default() {
            log::info!("{}: dropped {} bad RX chains, {} frames larger than their buffer, {} times a packet waited without an RX buffer", self.name, d.bad_chain, d.too_big, d.no_buffer);
        }
    }
}
