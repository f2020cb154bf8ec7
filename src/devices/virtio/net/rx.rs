//! The RX queue: guest buffers become `readv` SQEs on the tap that stay posted until a
//! packet arrives. One chain per read; with MRG_RXBUF the header says `num_buffers = 1`.
//!
//! At most [`RX_POSTED_MAX`] reads are posted at once: tun wakes every waiting read for
//! each packet, so the cap bounds that herd; a completed read pops and posts the next chain
//! right away. When the guest leaves the ring empty, a one-shot poll on the tap notices a
//! packet waiting without a buffer and counts it as a drop (the tap's own queue then
//! overflows and drops, which is what a full NIC ring does).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::frame::{self, RxBuf, IOVEC_EMPTY};
use super::handler::{Core, Drain, NetQueueParts, TAG_CANCEL, TAG_RX_POLL, TAG_STOP};
use super::tap::VNET_HDR_LEN;
use crate::metrics::QueueMetrics;
use crate::reactor::{QueueHandler, RingCtx};

/// Most reads posted on the tap per RX queue.
pub const RX_POSTED_MAX: usize = 64;
/// Iovecs per RX chain (Linux posts 1 or 2 descriptors per buffer; pages may straddle
/// memory regions).
pub const RX_IOV_MAX: usize = 32;

struct Slot {
    busy: bool,
    buf: RxBuf,
    iov: Box<[libc::iovec]>,
    posted: Instant,
}

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

/// One RX queue served by a reactor.
pub struct RxQueue {
    c: Core,
    slots: Box<[Slot]>,
    posted: usize,
    in_flight: usize,
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
        let size = usize::from(p.queue.size().max(1));
        let now = Instant::now();
        let slots = (0..size)
            .map(|_| Slot {
                busy: false,
                buf: RxBuf::default(),
                iov: vec![IOVEC_EMPTY; RX_IOV_MAX].into_boxed_slice(),
                posted: now,
            })
            .collect();
        RxQueue {
            c: Core::new(p),
            slots,
            posted: 0,
            in_flight: 0,
            drain: Drain::default(),
            poll_armed: false,
            want_notify: false,
            drops: RxDrops::default(),
            overflow: vec![0u8; 1].into_boxed_slice(),
        }
    }

    /// Serves `queue` as a freshly attached queue would, keeping the allocations (slots,
    /// metrics), for the fuzz harness. Nothing may be in flight.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn rearm(&mut self, queue: virtio_queue::Queue) {
        assert_eq!(self.in_flight, 0, "rearm with reads in flight");
        self.c.rearm(queue);
        self.slots.iter_mut().for_each(|s| s.busy = false);
        self.posted = 0;
        self.drain = Drain::default();
        self.poll_armed = false;
        self.want_notify = false;
        self.drops = RxDrops::default();
    }

    /// The state the RX, TX and control queues share.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn core(&self) -> &Core {
        &self.c
    }

    fn fd(&self) -> types::Fixed {
        types::Fixed(self.c.p.fixed)
    }

    /// Queues the read of slot `head`. On failure the chain goes back to the guest empty.
    fn post(&mut self, ctx: &mut RingCtx<'_, '_>, head: u16) {
        let h = usize::from(head);
        let slot = &mut self.slots[h];
        // parse_rx leaves the last iovec free for this.
        slot.iov[slot.buf.niov] = libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        };
        let e = opcode::Readv::new(
            types::Fixed(self.c.p.fixed),
            slot.iov.as_ptr(),
            slot.buf.niov as u32 + 1,
        )
        .build();
        slot.busy = true;
        slot.posted = ctx.now;
        // `overflow` is a boxed slice that never moves and is written only by reads.
        // SAFETY: the slot is not reused before its completion (`busy`), and the reactor keeps
        // the handler, `mem` and `overflow` until `in_flight` is 0: every buffer outlives the read.
        match unsafe { ctx.push(e, u32::from(head)) } {
            Ok(()) => {
                self.posted += 1;
                self.in_flight += 1;
            }
            Err(e) => {
                slot.busy = false;
                self.c
                    .drop_chain(format_args!("cannot submit a read: {e}"), ctx.now);
                self.c.add_used(head, 0, ctx.now);
            }
        }
    }

    /// Pops chains and posts reads until the cap or the ring is empty. Returns the pops.
    fn refill(&mut self, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        let mut n = 0;
        while n < budget && self.posted < RX_POSTED_MAX && !self.drain.stopping && !self.c.broken {
            let Some(chain) = self.c.p.queue.pop_descriptor_chain(&self.c.p.mem) else {
                break;
            };
            n += 1;
            let head = chain.head_index();
            let h = usize::from(head);
            if self.slots.get(h).is_none_or(|s| s.busy) {
                self.c.fail_queue(
                    &format!("descriptor head {head} made available while in use"),
                    ctx.now,
                );
                break;
            }
            match frame::parse_rx(
                chain,
                &self.c.p.mem,
                &mut self.slots[h].iov[..RX_IOV_MAX - 1],
            ) {
                Ok(buf) => {
                    self.slots[h].buf = buf;
                    self.post(ctx, head);
                }
                Err(e) => {
                    self.drops.bad_chain += 1;
                    self.c
                        .drop_chain(format_args!("RX chain (head {head}): {e}"), ctx.now);
                    self.c.add_used(head, 0, ctx.now);
                }
            }
        }
        if self.posted == 0 && !self.poll_armed && !self.drain.stopping && !self.c.broken {
            // Nothing to read into: notice packets that arrive anyway.
            let e = opcode::PollAdd::new(self.fd(), libc::POLLIN as u32).build();
            // SAFETY: a poll SQE references no memory.
            if unsafe { ctx.push(e, TAG_RX_POLL) }.is_ok() {
                self.poll_armed = true;
                self.in_flight += 1;
            }
        }
        n
    }

    fn read_done(&mut self, ctx: &mut RingCtx<'_, '_>, head: u16, res: i32) {
        let now = ctx.now;
        let h = usize::from(head);
        let Some(slot) = self.slots.get_mut(h).filter(|s| s.busy) else {
            log::error!("{}: completion for idle slot {h}", self.c.p.name);
            return;
        };
        slot.busy = false;
        let (buf, posted) = (slot.buf, slot.posted);
        self.posted -= 1;
        self.in_flight -= 1;
        if res > 0 && res as u32 > buf.len {
            // The read reached the overflow byte: tun truncated the frame. The buffer is
            // still the guest's to fill.
            self.drops.too_big += 1;
            self.c.drop_chain(
                format_args!(
                    "RX frame larger than the {}-byte buffer (head {head})",
                    buf.len
                ),
                now,
            );
            if self.drain.stopping {
                self.c.add_used(head, 0, now);
            } else {
                self.post(ctx, head);
            }
            return;
        }
        if res >= 0 && res < VNET_HDR_LEN as i32 {
            self.c.drop_chain(
                format_args!("RX read of {res} bytes has no room for a header (head {head})"),
                now,
            );
            self.c.add_used(head, 0, now);
            return;
        }
        if res >= 0 {
            // tun skips num_buffers (it writes the 10-byte legacy header): one buffer per frame.
            for (i, at) in buf.num_buffers.iter().enumerate() {
                if self.c.p.mem.write_obj(1u16.to_le_bytes()[i], *at).is_err() {
                    self.c.fail_queue("cannot write num_buffers", now);
                    return;
                }
            }
            let m = &mut self.c.p.metrics;
            m.counters.reads += 1;
            m.counters.bytes_read += (res as usize - VNET_HDR_LEN) as u64;
            m.record_service(now.saturating_duration_since(posted));
            self.c.add_used(head, res as u32, now);
            return;
        }
        match -res {
            libc::ECANCELED => self.c.add_used(head, 0, now),
            // tun consumed a frame that did not fit (EFAULT/EINVAL): the buffer is still free.
            libc::EFAULT | libc::EINVAL | libc::EMSGSIZE if !self.drain.stopping => {
                self.drops.too_big += 1;
                self.c.drop_chain(
                    format_args!(
                        "RX frame larger than the {}-byte buffer (head {head})",
                        buf.len
                    ),
                    now,
                );
                self.post(ctx, head);
            }
            libc::EAGAIN if !self.drain.stopping => self.post(ctx, head),
            _ => {
                self.c.drop_chain(
                    format_args!(
                        "RX read failed (head {head}): {}",
                        std::io::Error::from_raw_os_error(-res)
                    ),
                    now,
                );
                self.c.add_used(head, 0, now);
            }
        }
    }
}

impl QueueHandler for RxQueue {
    fn kick_fd(&self) -> RawFd {
        self.c.p.kick.as_raw_fd()
    }

    fn file_fd(&self) -> Option<RawFd> {
        self.c.p.tap_fd
    }

    fn poll_window(&self) -> Option<Duration> {
        self.c.p.poll
    }

    fn kicked(&mut self, now: Instant) {
        self.c.kicked(now);
    }

    fn set_notify(&mut self, enable: bool) -> bool {
        // While the reads are capped a kick would find nothing to do; `publish` enables
        // notifications again once a completion freed a slot.
        if enable && self.posted >= RX_POSTED_MAX {
            self.want_notify = true;
            return false;
        }
        if enable {
            self.want_notify = false;
        }
        self.c.set_notify(enable)
    }

    fn poll_avail(&mut self, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        if self.c.broken {
            return 0;
        }
        self.c.last_kick = None;
        if self.drain.arm(ctx, &self.c.p.stop, &self.c.p.name) {
            self.in_flight += 1;
        }
        if self.drain.stopping || !self.c.avail_sane(ctx.now) {
            return 0;
        }
        let n = self.refill(ctx, budget);
        self.c.p.metrics.record_batch(n);
        n
    }

    fn poll_hit(&mut self) {
        self.c.p.metrics.counters.poll_hits += 1;
    }

    fn complete(&mut self, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32) {
        match tag {
            TAG_STOP => {
                self.in_flight -= 1;
                if self.drain.stopped(ctx, self.c.p.fixed, &self.c.p.name) {
                    self.in_flight += 1;
                }
            }
            TAG_CANCEL => {
                self.in_flight -= 1;
                self.drain.cancelling = false;
            }
            TAG_RX_POLL => {
                self.in_flight -= 1;
                self.poll_armed = false;
                if res > 0 && self.posted == 0 {
                    self.drops.no_buffer += 1;
                    self.c.drop_chain(
                        format_args!("a packet is waiting and the guest posted no RX buffer"),
                        ctx.now,
                    );
                }
                // Re-armed only after a read was posted again: the poll is level-triggered.
            }
            _ => {
                self.read_done(ctx, tag as u16, res);
                if !self.drain.stopping && !self.c.broken && self.refill(ctx, RX_POSTED_MAX) > 0 {
                    self.want_notify = true;
                }
            }
        }
    }

    fn publish(&mut self) {
        if self.want_notify && self.posted < RX_POSTED_MAX && !self.c.broken && !self.drain.stopping
        {
            self.want_notify = false;
            if self.c.set_notify(true) {
                // Buffers arrived after the last pop and the driver will not kick for them:
                // kick ourselves (rare: only when the race is lost).
                let _ = self.c.p.kick.write(1);
            }
        }
        self.c.publish();
    }

    fn in_flight(&self) -> usize {
        self.drain.signal(&self.c.p.stop);
        self.in_flight
    }

    fn metrics(&self) -> &QueueMetrics {
        &self.c.p.metrics
    }
    fn metrics_mut(&mut self) -> &mut QueueMetrics {
        &mut self.c.p.metrics
    }
}

impl RxQueue {
    /// Reads posted on the tap right now.
    pub fn posted(&self) -> usize {
        self.posted
    }
}

impl Drop for RxQueue {
    /// The drop reasons behind the `errors` column, once per queue life.
    fn drop(&mut self) {
        let d = &self.drops;
        if *d != RxDrops::default() {
            log::info!("{}: dropped {} bad RX chains, {} frames larger than their buffer, {} times a packet waited without an RX buffer", self.c.p.name, d.bad_chain, d.too_big, d.no_buffer);
        }
    }
}
