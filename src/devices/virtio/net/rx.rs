//! The RX queue: guest buffers become `readv` SQEs on the tap that stay posted until a
//! frame arrives, one `readv` per frame.
//!
//! **Reads and chains.** Without MRG_RXBUF a read is one chain: a frame must fit one buffer
//! (virtio 1.2, 5.1.6.3.1). With MRG_RXBUF a read spans as many chains as it takes to hold
//! the header and the largest frame the tap may deliver ([`RxQueue::with_frame_max`]: the
//! MTU's, or 64 KiB once TSO/UFO are on); tun fills them in order, and the completion gives
//! back the first k (the chains the frame needed, 5.1.6.4), with `num_buffers = k` written
//! into the first one's header and the k used entries made visible by one used-index store
//! ([`QueueCore::push_used_all`]), so a driver never sees part of a frame. When the guest's
//! buffers hold the largest frame (Linux posts buffers of at least 1530 bytes, enough for a
//! 1500-byte MTU) every read is one chain, as without MRG_RXBUF.
//!
//! **Chains a frame did not need** stay the device's: they go back to the front of the
//! reserve (chains popped and parsed but not posted) and start the next read. They are kept
//! rather than peeked at in the avail ring because several reads are posted at once, each
//! with chains of its own, and completions come in any order: peeked chains could only be
//! consumed in ring order. Kept chains go back to the driver (length 0) when the queue stops,
//! as posted ones do.
//!
//! **Too few buffers.** A read with less room than the largest frame is posted only when no
//! other read is posted and the ring has nothing more: a frame that does not fit is then
//! dropped and counted (`too_big`) and its chains are kept for the next read. Otherwise the
//! chains gathered so far wait in the reserve until the guest posts more.
//!
//! **Truncation.** One host byte (`overflow`) follows every read's guest buffers: tun
//! truncates a frame that does not fit and returns the bytes copied, so a read that reaches
//! this byte was truncated; nothing of it is given to the guest.
//!
//! At most [`RX_POSTED_MAX`] reads are posted at once: tun wakes every waiting read for
//! each packet, so the cap bounds that herd; a completed read posts the next one right away.
//! When the guest leaves the ring empty, a one-shot poll on the tap notices a packet waiting
//! without a buffer and counts it as a drop (the tap's own queue then overflows and drops,
//! which is what a full NIC ring does).
//!
//! Everything (per-head parse results and iovecs, the reads' iovec arrays, the reserve) is
//! allocated in [`RxQueue::new`]; the data path allocates nothing.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::Instant;

use io_uring::{opcode, types};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::config::features as f;
use super::frame::{self, RxBuf, FRAME_MAX};
use super::handler::{drop_chain, Drain, NetQueueParts, TAG_CANCEL, TAG_RX_POLL, TAG_STOP};
use super::tap::VNET_HDR_LEN;
use crate::devices::virtio::queue::{DeviceQueue, QueueCore, UsedIndex, Virtqueue, IOVEC_EMPTY};
use crate::reactor::RingCtx;

/// Most reads posted on the tap per RX queue.
pub const RX_POSTED_MAX: usize = 64;
/// Iovecs per RX chain (Linux posts 1 or 2 descriptors per buffer; pages may straddle
/// memory regions).
pub const RX_IOV_MAX: usize = 32;
/// Most chains one read spans (MRG_RXBUF): 64 buffers of 1530 bytes (Linux's smallest)
/// hold a 64 KiB frame with room to spare.
pub const RX_CHAINS_MAX: usize = 64;
/// Most iovecs of one read, the overflow byte included.
pub const RX_READ_IOV_MAX: usize = 2 * RX_CHAINS_MAX;
/// The largest frame without GSO on a tap with the default MTU: 1500 bytes, Ethernet and
/// VLAN headers.
pub const FRAME_MAX_MTU1500: u32 = 1500 + 14 + 4;

/// One RX queue served by a reactor.
pub type RxQueue = Virtqueue<RxRequests>;

/// Counters beyond [`QueueMetrics`] (the `errors` column sums them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxDrops {
    /// Chains dropped by the parser.
    pub bad_chain: u64,
    /// Frames the tap dropped because the buffers were too small.
    pub too_big: u64,
    /// Times a packet waited on the tap while the guest had no RX buffer posted.
    pub no_buffer: u64,
}

/// One posted read: the chains it spans, in order, and their iovecs.
struct Read {
    heads: Box<[u16]>,
    n: usize,
    iov: Box<[libc::iovec]>,
    /// Bytes the chains hold.
    cap: u64,
    posted: Instant,
    /// Posted and not completed.
    busy: bool,
}

/// The buffers of one RX queue.
pub struct RxRequests {
    /// `net0-rx0`, for the drop summary when the queue goes.
    name: String,
    tap_fd: Option<RawFd>,
    fixed: u32,
    stop: EventFd,
    /// Several chains per read (MRG_RXBUF).
    mrg: bool,
    /// Bytes a read should hold: the header and the largest frame.
    want: u64,
    /// Per head: the parsed chain, its iovecs (`RX_IOV_MAX` from `head * RX_IOV_MAX`), and
    /// whether the device holds it (in the reserve or a posted read).
    chains: Box<[RxBuf]>,
    chain_iov: Box<[libc::iovec]>,
    held: Box<[bool]>,
    /// Chains popped and parsed, not posted yet, and the bytes they hold.
    reserve: VecDeque<u16>,
    reserve_bytes: u64,
    /// Posted reads by tag, the free tags, and how many are posted.
    reads: Box<[Read]>,
    free_reads: Vec<u32>,
    posted: usize,
    /// Operations in flight besides the reads: the stop poll, the cancel, the RX poll.
    other_in_flight: usize,
    drain: Drain,
    poll_armed: bool,
    /// A read completed while the RX poll was armed: the poll's result may be the frame that
    /// read took, not one still waiting.
    poll_stale: bool,
    /// The poll found a packet waiting with no read posted, and that was counted: the poll
    /// (level-triggered) stays off until a read is posted again, so one wait counts once
    /// and a polling reactor does not re-arm it every pass.
    waiting_counted: bool,
    /// Notifications must be re-enabled once a read slot is free: chains were popped in a
    /// completion (next_avail moved past avail_event) or the reactor's enable was skipped
    /// while the reads were capped.
    want_notify: bool,
    pub drops: RxDrops,
    /// One host byte behind every read's guest buffers (module docs, truncation).
    overflow: Box<[u8]>,
}

impl RxQueue {
    /// Builds the queue state; call on the reactor thread. Reads are sized for frames of
    /// 64 KiB when the driver acknowledged GSO to the guest, else for a 1500-byte MTU
    /// (see [`with_frame_max`](Self::with_frame_max)).
    pub fn new(p: NetQueueParts) -> Self {
        let qsize = p.queue.queue_size().max(1);
        let mrg = p.acked & f::MRG_RXBUF != 0;
        let gso = p.acked & (f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_UFO) != 0;
        let reads = (0..RX_POSTED_MAX)
            .map(|_| Read {
                heads: vec![0u16; RX_CHAINS_MAX].into_boxed_slice(),
                n: 0,
                iov: vec![IOVEC_EMPTY; RX_READ_IOV_MAX].into_boxed_slice(),
                cap: 0,
                posted: Instant::now(),
                busy: false,
            })
            .collect();
        let mut q = Virtqueue {
            dev: RxRequests {
                name: p.queue.name.clone(),
                tap_fd: p.tap_fd,
                fixed: p.fixed,
                stop: p.stop,
                mrg,
                want: 0,
                chains: vec![RxBuf::default(); qsize].into_boxed_slice(),
                chain_iov: vec![IOVEC_EMPTY; qsize * RX_IOV_MAX].into_boxed_slice(),
                held: vec![false; qsize].into_boxed_slice(),
                reserve: VecDeque::with_capacity(qsize),
                reserve_bytes: 0,
                reads,
                free_reads: (0..RX_POSTED_MAX as u32).rev().collect(),
                posted: 0,
                other_in_flight: 0,
                drain: Drain::default(),
                poll_armed: false,
                poll_stale: false,
                waiting_counted: false,
                want_notify: false,
                drops: RxDrops::default(),
                overflow: vec![0u8; 1].into_boxed_slice(),
            },
            core: QueueCore::new(p.queue).with_used_index(UsedIndex::PerEntry),
        };
        q = q.with_frame_max(if gso { FRAME_MAX } else { FRAME_MAX_MTU1500 });
        q
    }

    /// The largest Ethernet frame the tap may deliver (set from the tap's MTU and offloads
    /// at activation): with MRG_RXBUF a read spans chains until it holds that and the header.
    pub fn with_frame_max(mut self, bytes: u32) -> Self {
        self.dev.want = u64::from(bytes) + VNET_HDR_LEN as u64;
        self
    }

    /// Reads posted on the tap right now.
    pub fn posted(&self) -> usize {
        self.dev.posted
    }

    /// Chains the device holds without a read posted on them.
    pub fn reserved(&self) -> usize {
        self.dev.reserve.len()
    }
}

impl RxRequests {
    fn fd(&self) -> types::Fixed {
        types::Fixed(self.fixed)
    }

    /// Hands chains the device holds back to the driver with nothing written.
    fn give_back(&mut self, core: &mut QueueCore, heads: impl IntoIterator<Item = u16>) {
        for h in heads {
            self.held[usize::from(h)] = false;
            core.push_used(h, 0);
        }
    }

    /// Keeps chains of a completed read for the next one (at the front of the reserve, in
    /// their order), or gives them back when the queue is stopping.
    fn keep(&mut self, core: &mut QueueCore, tag: usize, from: usize) {
        let n = self.reads[tag].n;
        for i in (from..n).rev() {
            let h = self.reads[tag].heads[i];
            if self.drain.stopping {
                self.held[usize::from(h)] = false;
                core.push_used(h, 0);
            } else {
                self.reserve.push_front(h);
                self.reserve_bytes += u64::from(self.chains[usize::from(h)].len);
            }
        }
    }

    /// Posts one read over chains from the front of the reserve: one chain without
    /// MRG_RXBUF, else until they hold `want` bytes (or a read's limits). On failure the
    /// chains go back to the guest empty. False when no read is free (nothing was taken).
    fn post(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>) -> bool {
        let Some(tag) = self.free_reads.pop() else {
            return false;
        };
        let r = &mut self.reads[tag as usize];
        let (mut n, mut niov, mut cap) = (0usize, 0usize, 0u64);
        while let Some(&h) = self.reserve.front() {
            let b = self.chains[usize::from(h)];
            if n > 0 && (n == RX_CHAINS_MAX || niov + b.niov >= RX_READ_IOV_MAX) {
                break;
            }
            self.reserve.pop_front();
            self.reserve_bytes -= u64::from(b.len);
            let at = usize::from(h) * RX_IOV_MAX;
            r.iov[niov..niov + b.niov].copy_from_slice(&self.chain_iov[at..at + b.niov]);
            r.heads[n] = h;
            n += 1;
            niov += b.niov;
            cap += u64::from(b.len);
            if !self.mrg || cap >= self.want {
                break;
            }
        }
        r.iov[niov] = libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        };
        (r.n, r.cap) = (n, cap);
        let e =
            opcode::Readv::new(types::Fixed(self.fixed), r.iov.as_ptr(), niov as u32 + 1).build();
        // SAFETY: the read fills the read's iovecs: guest buffers of chains the device holds
        // until the completion, and `overflow`, a boxed slice that never moves, lives as long
        // as the queue and is written only by reads. The iovec array is boxed, stays with
        // its tag until the completion, and the reactor keeps the queue while reads are in
        // flight.
        match unsafe { ctx.push(e, tag) } {
            Ok(()) => {
                r.posted = ctx.now;
                r.busy = true;
                self.posted += 1;
                self.waiting_counted = false;
            }
            Err(e) => {
                drop_chain(core, format_args!("cannot submit a read: {e}"), ctx.now);
                self.free_reads.push(tag);
                for i in 0..n {
                    let h = self.reads[tag as usize].heads[i];
                    self.give_back(core, [h]);
                }
            }
        }
        true
    }

    /// Pops chains into the reserve and posts reads until the cap or the ring is empty.
    /// Returns the pops.
    fn refill(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        let now = ctx.now;
        let mut n = 0;
        if self.drain.stopping {
            return 0;
        }
        if self.posted < RX_POSTED_MAX {
            core.avail(now);
        }
        let mut ring_empty = false;
        while self.posted < RX_POSTED_MAX && !core.is_broken() {
            while !ring_empty
                && n < budget
                && (self.reserve.is_empty() || (self.mrg && self.reserve_bytes < self.want))
            {
                let Some(head) = core.pop(now, |h| self.held.get(h).is_some_and(|b| *b)) else {
                    ring_empty = true;
                    break;
                };
                n += 1;
                let at = usize::from(head) * RX_IOV_MAX;
                let iov = &mut self.chain_iov[at..at + RX_IOV_MAX - 1];
                match frame::parse_rx(core.chain(head), core.mem(), iov) {
                    Ok(buf) => {
                        self.chains[usize::from(head)] = buf;
                        self.held[usize::from(head)] = true;
                        self.reserve.push_back(head);
                        self.reserve_bytes += u64::from(buf.len);
                    }
                    Err(e) => {
                        self.drops.bad_chain += 1;
                        drop_chain(core, format_args!("RX chain (head {head}): {e}"), now);
                        core.push_used(head, 0);
                    }
                }
            }
            let full = !self.mrg || self.reserve_bytes >= self.want;
            let lone = self.posted == 0 && ring_empty;
            if self.reserve.is_empty() || !(full || lone) || !self.post(core, ctx) {
                break;
            }
        }
        if self.posted == 0
            && ring_empty
            && !self.poll_armed
            && !self.waiting_counted
            && !core.is_broken()
        {
            self.arm_poll(ctx);
        }
        n
    }

    /// Nothing to read into: notices packets that arrive anyway.
    fn arm_poll(&mut self, ctx: &mut RingCtx<'_, '_>) {
        let e = opcode::PollAdd::new(self.fd(), libc::POLLIN as u32).build();
        // SAFETY: a poll SQE references no memory.
        if unsafe { ctx.push(e, TAG_RX_POLL) }.is_ok() {
            self.poll_armed = true;
            self.poll_stale = false;
            self.other_in_flight += 1;
        }
    }

    fn too_big(&mut self, core: &mut QueueCore, cap: u64, tag: usize, now: Instant) {
        self.drops.too_big += 1;
        let n = self.reads[tag].n;
        let what = format_args!("RX frame larger than the {cap} bytes of its {n} buffers");
        drop_chain(core, what, now);
    }

    /// A frame (or nothing) landed in the buffers of read `tag`: give the chains it filled
    /// to the driver and keep the rest.
    fn read_done(&mut self, core: &mut QueueCore, tag: u32, res: i32, now: Instant) {
        let t = tag as usize;
        let Some(r) = self.reads.get_mut(t).filter(|r| r.busy) else {
            log::error!("{}: completion for idle read {tag}", core.name());
            return;
        };
        r.busy = false;
        let (n, cap, posted) = (r.n, r.cap, r.posted);
        self.poll_stale |= self.poll_armed;
        let first = r.heads[0];
        self.posted -= 1;
        self.free_reads.push(tag);
        if n == 0 {
            return;
        }
        if res > 0 && res as u64 > cap {
            // The read reached the overflow byte: tun truncated the frame. The buffers are
            // still the guest's to fill.
            self.too_big(core, cap, t, now);
            self.keep(core, t, 0);
            return;
        }
        if res >= 0 && res < VNET_HDR_LEN as i32 {
            drop_chain(
                core,
                format_args!("RX read of {res} bytes has no room for a header (head {first})"),
                now,
            );
            self.give_back(core, [first]);
            self.keep(core, t, 1);
            return;
        }
        if res >= 0 {
            let total = res as u64;
            // The chains the frame reached (the first holds the whole header: every chain
            // has room for one).
            let (mut k, mut sum) = (0usize, 0u64);
            while k < n && sum < total {
                sum += u64::from(self.chains[usize::from(self.reads[t].heads[k])].len);
                k += 1;
            }
            // tun writes the 10-byte legacy header and skips num_buffers.
            let nb = (k as u16).to_le_bytes();
            for (i, at) in self.chains[usize::from(first)]
                .num_buffers
                .iter()
                .enumerate()
            {
                if core.mem().write_obj(nb[i], *at).is_err() {
                    core.fail("cannot write num_buffers", now);
                    return;
                }
            }
            let (chains, held) = (&self.chains, &mut self.held);
            let mut left = total;
            core.push_used_all(self.reads[t].heads[..k].iter().map(|&h| {
                held[usize::from(h)] = false;
                let take = left.min(u64::from(chains[usize::from(h)].len));
                left -= take;
                (h, take as u32)
            }));
            self.keep(core, t, k);
            let m = core.metrics_mut();
            m.counters.reads += 1;
            m.counters.bytes_read += total - VNET_HDR_LEN as u64;
            m.record_service(now.saturating_duration_since(posted));
            return;
        }
        match -res {
            libc::ECANCELED => {
                self.give_back(core, [first]);
                self.keep(core, t, 1);
            }
            // tun consumed a frame that did not fit (EFAULT/EINVAL): the buffers are free.
            libc::EFAULT | libc::EINVAL | libc::EMSGSIZE if !self.drain.stopping => {
                self.too_big(core, cap, t, now);
                self.keep(core, t, 0);
            }
            libc::EAGAIN if !self.drain.stopping => self.keep(core, t, 0),
            _ => {
                let why = std::io::Error::from_raw_os_error(-res);
                drop_chain(
                    core,
                    format_args!("RX read failed (head {first}): {why}"),
                    now,
                );
                self.give_back(core, [first]);
                self.keep(core, t, 1);
            }
        }
    }

    /// The queue stops: the reserve goes back to the driver (posted reads come back
    /// cancelled).
    fn release_reserve(&mut self, core: &mut QueueCore) {
        while let Some(h) = self.reserve.pop_front() {
            self.give_back(core, [h]);
        }
        self.reserve_bytes = 0;
    }
}

impl DeviceQueue for RxRequests {
    fn file_fd(&self) -> Option<RawFd> {
        self.tap_fd
    }

    fn set_notify(&mut self, core: &mut QueueCore, enable: bool) -> bool {
        // While the reads are capped a kick would find nothing to do; `before_publish`
        // enables notifications again once a completion freed a slot.
        if enable && self.posted >= RX_POSTED_MAX {
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
                self.release_reserve(core);
            }
            TAG_CANCEL => {
                self.other_in_flight -= 1;
                self.drain.cancelling = false;
            }
            TAG_RX_POLL => {
                self.other_in_flight -= 1;
                self.poll_armed = false;
                let stale = std::mem::take(&mut self.poll_stale);
                if res > 0 && self.posted == 0 && stale {
                    // Perhaps the frame the last read took: look again (level-triggered, so
                    // a packet still waiting answers at once).
                    if !self.drain.stopping && !core.is_broken() {
                        self.arm_poll(ctx);
                    }
                } else if res > 0 && self.posted == 0 {
                    self.waiting_counted = true;
                    self.drops.no_buffer += 1;
                    drop_chain(
                        core,
                        format_args!("a packet is waiting and the guest posted no RX buffer"),
                        ctx.now,
                    );
                }
                // Otherwise re-armed only after a read was posted again: the poll is
                // level-triggered.
            }
            _ => {
                self.read_done(core, tag, res, ctx.now);
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
            && self.posted < RX_POSTED_MAX
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
        self.posted + self.other_in_flight
    }

    #[cfg(any(test, feature = "fuzz"))]
    fn rearm(&mut self) {
        self.held.iter_mut().for_each(|h| *h = false);
        self.reserve.clear();
        self.reserve_bytes = 0;
        self.free_reads.clear();
        self.free_reads.extend((0..RX_POSTED_MAX as u32).rev());
        self.reads.iter_mut().for_each(|r| r.busy = false);
        self.posted = 0;
        self.other_in_flight = 0;
        self.drain = Drain::default();
        self.poll_armed = false;
        self.poll_stale = false;
        self.waiting_counted = false;
        self.want_notify = false;
        self.drops = RxDrops::default();
    }
}

impl Drop for RxRequests {
    /// The drop reasons behind the `errors` column, once per queue life.
    fn drop(&mut self) {
        let d = &self.drops;
        if *d != RxDrops::default() {
            log::info!("{}: dropped {} bad RX chains, {} frames larger than their buffers, {} times a packet waited without an RX buffer", self.name, d.bad_chain, d.too_big, d.no_buffer);
        }
    }
}
