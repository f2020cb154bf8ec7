//! The per-queue handler: it lives on a reactor, pops chains, hands them to the parser, turns
//! parsed requests into back-end operations and completes them. It never parses.
//!
//! Request slots (with their iovec arrays) are allocated when the queue is attached and
//! indexed by descriptor head, so the data path allocates nothing; completions write the
//! status byte and the used element at once, the used index is published once per batch
//! ([`Rings`]) and the interrupt goes out once per batch, only if EVENT_IDX (or
//! NO_INTERRUPT) says the driver wants it and never when the queue has no vector.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use super::backend::QueueIo;
use super::config::DiskInfo;
use super::request::{
    self, Request, RequestError, RequestType, Segment, IOVEC_EMPTY, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use super::rings::Rings;
use crate::devices::virtio::GuestMemory;
use crate::metrics::QueueMetrics;
use crate::reactor::{QueueHandler, RingCtx};

/// Log lines per second one queue may emit about bad guest input.
const LOG_LINES_PER_SEC: u32 = 10;
/// Extra iovecs beyond seg_max, for buffers that straddle guest memory regions.
const IOV_SLACK: usize = 8;

/// Limits how often a queue logs about guest misbehaviour.
#[derive(Debug)]
pub struct LogLimiter {
    window: Instant,
    lines: u32,
    dropped: u64,
}

impl LogLimiter {
    pub fn new() -> Self {
        LogLimiter {
            window: Instant::now(),
            lines: 0,
            dropped: 0,
        }
    }

    /// True when a line may be logged now.
    pub fn allow(&mut self, now: Instant, who: &str) -> bool {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            if self.dropped > 0 {
                log::warn!(
                    "{who}: {} more messages about bad requests suppressed",
                    self.dropped
                );
            }
            self.window = now;
            self.lines = 0;
            self.dropped = 0;
        }
        if self.lines < LOG_LINES_PER_SEC {
            self.lines += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

struct Slot {
    busy: bool,
    /// Served through the buffered twin of an O_DIRECT disk.
    buffered: bool,
    req: Request,
    iov: Box<[libc::iovec]>,
    popped: Instant,
    kick: Instant,
}

/// Everything a queue needs on its reactor, moved there at activation.
pub struct QueueParts {
    /// `blk0-q1`, for logs.
    pub name: String,
    pub mem: GuestMemory,
    pub queue: Queue,
    pub kick: EventFd,
    pub irq: Option<EventFd>,
    pub disk: Arc<DiskInfo>,
    pub needs_reset: Arc<AtomicBool>,
    pub poll: Option<Duration>,
    pub metrics: QueueMetrics,
    /// Receives the queue's next avail index when the queue is dropped (after its drain):
    /// vhost-user's GET_VRING_BASE answers with it.
    pub final_avail: Option<Arc<AtomicU32>>,
}

/// One virtio-blk queue served by a reactor.
pub struct BlockQueue {
    p: QueueParts,
    io: Option<QueueIo>,
    /// Disk file and its buffered twin, registered by the reactor.
    files: [Option<RawFd>; 2],
    /// `None` when the rings are not inside guest memory (the queue is then broken).
    rings: Option<Rings>,
    slots: Box<[Slot]>,
    scratch: Box<[Segment]>,
    in_flight: usize,
    last_kick: Option<Instant>,
    dirty: bool,
    broken: bool,
    log: LogLimiter,
    /// The notice about O_DIRECT fallbacks was logged.
    noted_buffered: bool,
}

impl BlockQueue {
    /// Builds the queue state; call on the reactor thread. `io` is `None` for the null back
    /// end; `files` are the disk file and its buffered twin, which the reactor registers.
    pub fn new(p: QueueParts, io: Option<QueueIo>, files: [Option<RawFd>; 2]) -> Self {
        let size = usize::from(p.queue.size().max(1));
        let segs = p.disk.seg_max as usize + 2;
        let now = Instant::now();
        let slots = (0..size)
            .map(|_| Slot {
                busy: false,
                buffered: false,
                req: Request {
                    kind: RequestType::Flush,
                    sector: 0,
                    data_len: 0,
                    niov: 0,
                    status: GuestAddress(0),
                    num_sectors: 0,
                    unmap: false,
                    unaligned: false,
                },
                iov: vec![IOVEC_EMPTY; segs + IOV_SLACK].into_boxed_slice(),
                popped: now,
                kick: now,
            })
            .collect();
        let rings = Rings::new(&p.mem, &p.queue);
        let mut q = BlockQueue {
            rings: None,
            p,
            io,
            files,
            slots,
            scratch: vec![Segment::default(); segs].into_boxed_slice(),
            in_flight: 0,
            last_kick: None,
            dirty: false,
            broken: false,
            log: LogLimiter::new(),
            noted_buffered: false,
        };
        match rings {
            Some(r) => q.rings = Some(r),
            None => q.fail_queue("the rings are misaligned or outside guest memory", now),
        }
        q
    }

    /// Serves `queue` as a freshly attached queue would, keeping every allocation (slots,
    /// metrics): the fuzz harness runs millions of queues through one handler. Nothing may
    /// be in flight.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn rearm(&mut self, queue: Queue) {
        assert_eq!(self.in_flight, 0, "rearm with requests in flight");
        self.p.queue = queue;
        for s in self.slots.iter_mut() {
            s.busy = false;
            s.buffered = false;
        }
        if let Some(io) = self.io.as_mut() {
            io.zero_range = true;
        }
        self.last_kick = None;
        self.dirty = false;
        self.broken = false;
        self.p.needs_reset.store(false, Ordering::Release);
        self.rings = Rings::new(&self.p.mem, &self.p.queue);
        if self.rings.is_none() {
            self.fail_queue(
                "the rings are misaligned or outside guest memory",
                Instant::now(),
            );
        }
    }

    /// The queue stopped serving until the device is reset.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// (chains popped, used entries written) since the queue was set up.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn progress(&self) -> (u16, u16) {
        let used = self.rings.as_ref().map_or(0, Rings::next_used);
        (self.p.queue.next_avail(), used)
    }

    fn fail_queue(&mut self, what: &str, now: Instant) {
        if self.log.allow(now, &self.p.name) {
            log::error!("{}: {what}; the device needs a reset", self.p.name);
        }
        self.broken = true;
        self.p.needs_reset.store(true, Ordering::Release);
    }

    fn bad_request(&mut self, head: u16, e: &RequestError, now: Instant) {
        if self.log.allow(now, &self.p.name) {
            log::warn!("{}: bad request (head {head}): {}", self.p.name, e.error);
        }
    }

    /// Writes the status byte and the used entry, and records metrics.
    fn finish(
        &mut self,
        head: u16,
        status_at: Option<GuestAddress>,
        status: u8,
        used_len: u32,
        req: Option<(&Request, Instant, Instant)>,
        now: Instant,
    ) {
        if let Some(at) = status_at {
            let Some(p) = request::host_range(&self.p.mem, at.0, 1) else {
                self.fail_queue("cannot write a status byte", now);
                return;
            };
            // SAFETY: `host_range` checked that the byte lies in mapped guest memory, which
            // `self.p.mem` keeps mapped.
            unsafe { std::ptr::write_volatile(p, status) };
        }
        let Some(rings) = self.rings.as_mut() else {
            return;
        };
        rings.push_used(head, used_len);
        self.dirty = true;
        let c = &mut self.p.metrics.counters;
        match status {
            VIRTIO_BLK_S_OK => {}
            VIRTIO_BLK_S_UNSUPP => c.unsupported += 1,
            _ => c.errors += 1,
        }
        let Some((req, popped, kick)) = req else {
            return;
        };
        let ok = status == VIRTIO_BLK_S_OK;
        if status != VIRTIO_BLK_S_UNSUPP {
            match req.kind {
                RequestType::In => {
                    c.reads += 1;
                    c.bytes_read += if ok { u64::from(req.data_len) } else { 0 };
                }
                RequestType::Out => {
                    c.writes += 1;
                    c.bytes_written += if ok { u64::from(req.data_len) } else { 0 };
                }
                RequestType::Flush => c.flushes += 1,
                RequestType::GetId => c.get_ids += 1,
                RequestType::Discard => c.discards += 1,
                RequestType::WriteZeroes => c.write_zeroes += 1,
            }
        }
        self.p
            .metrics
            .record_service(now.saturating_duration_since(popped));
        self.p
            .metrics
            .record_k2c(now.saturating_duration_since(kick));
    }

    /// Starts one parsed request: completes it inline or queues its SQE.
    fn start(&mut self, ctx: &mut RingCtx<'_, '_>, head: u16, kick: Instant) {
        let now = ctx.now;
        let h = usize::from(head);
        let req = self.slots[h].req;
        let buffered = req.unaligned && self.io.as_ref().is_some_and(QueueIo::has_buffered);
        let entry = match (&self.io, req.kind) {
            (_, RequestType::GetId) => {
                let mut left = &self.p.disk.id[..req.data_len as usize];
                for v in &self.slots[h].iov[..req.niov] {
                    let take = v.iov_len.min(left.len());
                    // SAFETY: the parser checked that this iovec lies inside guest memory, which
                    // `self.p.mem` keeps mapped; `left` is a host buffer that cannot overlap it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(left.as_ptr(), v.iov_base.cast::<u8>(), take)
                    };
                    left = &left[take..];
                }
                None
            }
            (None, _) => None,
            (Some(_), RequestType::In | RequestType::Out) if req.niov == 0 => None,
            (Some(io), RequestType::In | RequestType::Out) => {
                let iov = &self.slots[h].iov;
                let write = req.kind == RequestType::Out;
                let fixed = (req.niov == 1)
                    .then(|| ctx.fixed_buffer(iov[0].iov_base as usize, iov[0].iov_len))
                    .flatten();
                Some(match fixed {
                    Some(buf) => io.rw_fixed(write, &iov[0], buf, req.offset(), buffered),
                    None => io.rw_vectored(write, iov.as_ptr(), req.niov, req.offset(), buffered),
                })
            }
            (Some(io), RequestType::Flush) => Some(io.flush()),
            (Some(io), RequestType::Discard) => Some(io.punch(
                req.offset(),
                u64::from(req.num_sectors) << request::SECTOR_SHIFT,
            )),
            (Some(io), RequestType::WriteZeroes) => Some(io.write_zeroes(
                req.offset(),
                u64::from(req.num_sectors) << request::SECTOR_SHIFT,
                req.unmap,
            )),
        };
        let Some(entry) = entry else {
            self.finish(
                head,
                Some(req.status),
                VIRTIO_BLK_S_OK,
                req.used_len_ok(),
                Some((&req, now, kick)),
                now,
            );
            return;
        };
        let slot = &mut self.slots[h];
        slot.busy = true;
        slot.buffered = buffered;
        slot.popped = now;
        slot.kick = kick;
        // The reactor keeps the queue (and `self.p.mem`, which maps the guest buffers) until
        // in_flight is 0, and the slot is not reused before its completion is reaped (`busy`).
        // SAFETY: the iovecs and the guest buffers they point to outlive the request.
        match unsafe { ctx.push(entry, u32::from(head)) } {
            Ok(()) => self.in_flight += 1,
            Err(e) => {
                slot.busy = false;
                if self.log.allow(now, &self.p.name) {
                    log::error!("{}: cannot submit a request: {e}", self.p.name);
                }
                self.finish(
                    head,
                    Some(req.status),
                    VIRTIO_BLK_S_IOERR,
                    1,
                    Some((&req, now, kick)),
                    now,
                );
            }
        }
    }
}

impl Drop for BlockQueue {
    /// The reactor drops a queue once it drained: nothing is in flight, so the next avail
    /// index is where a restarted queue must resume.
    fn drop(&mut self) {
        if let Some(at) = &self.p.final_avail {
            at.store(u32::from(self.p.queue.next_avail()), Ordering::Release);
        }
    }
}

impl QueueHandler for BlockQueue {
    fn kick_fd(&self) -> RawFd {
        self.p.kick.as_raw_fd()
    }

    fn file_fd(&self) -> Option<RawFd> {
        self.files[0]
    }

    fn alt_file_fd(&self) -> Option<RawFd> {
        self.files[1]
    }

    fn poll_window(&self) -> Option<Duration> {
        self.p.poll
    }

    fn kicked(&mut self, now: Instant) {
        self.p.metrics.counters.kicks += 1;
        self.last_kick.get_or_insert(now);
    }

    fn set_notify(&mut self, enable: bool) -> bool {
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

    fn poll_avail(&mut self, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        if self.broken {
            return 0;
        }
        let kick = self.last_kick.take().unwrap_or(ctx.now);
        // virtio-queue logs (without rate limit) and yields nothing when the driver's avail
        // index runs more than a queue ahead; catch that once here instead.
        let Some(rings) = self.rings.as_ref() else {
            return 0;
        };
        let next = self.p.queue.next_avail();
        let size = self.p.queue.size();
        let avail_idx = rings.avail_idx();
        if avail_idx.wrapping_sub(next) > size {
            // virtio-queue would log (without rate limit) and yield nothing on every pass.
            self.fail_queue(
                &format!("avail index {avail_idx} is more than the queue size ahead of {next}"),
                ctx.now,
            );
            return 0;
        }
        let desc_table = GuestAddress(self.p.queue.desc_table());
        let mut n = 0;
        while n < budget && next.wrapping_add(n as u16) != avail_idx && !self.broken {
            let Some(head) = self
                .rings
                .as_ref()
                .map(|r| r.avail_head(next.wrapping_add(n as u16)))
            else {
                break;
            };
            n += 1;
            let h = usize::from(head);
            if self.slots.get(h).is_none_or(|s| s.busy) {
                // A head beyond the queue, or made available twice while in flight: its
                // buffers may be in use, so the chain cannot be answered.
                self.fail_queue(
                    &format!("descriptor head {head} is out of range or already in flight"),
                    ctx.now,
                );
                continue;
            }
            let chain = request::Chain::new(&self.p.mem, desc_table, size, head);
            let parsed = request::parse(
                chain,
                &self.p.mem,
                &self.p.disk,
                &mut self.scratch,
                &mut self.slots[h].iov,
            );
            match parsed {
                Ok(req) => {
                    self.slots[h].req = req;
                    self.start(ctx, head, kick);
                }
                Err(e) => {
                    self.bad_request(head, &e, ctx.now);
                    match e.status {
                        Some(at) => self.finish(head, Some(at), e.error.status(), 1, None, ctx.now),
                        // A loop, a bad indirect table, a status byte outside RAM or not
                        // writable: there is no status to answer with, and a used entry alone
                        // would let the driver read a stale status as success. The device
                        // asks for a reset instead, as QEMU does (virtio 1.2, 2.1.2).
                        None => self.fail_queue(
                            &format!("head {head} cannot be answered: {}", e.error),
                            ctx.now,
                        ),
                    }
                }
            }
        }
        self.p.queue.set_next_avail(next.wrapping_add(n as u16));
        self.p.metrics.record_batch(n);
        n
    }

    fn poll_hit(&mut self) {
        self.p.metrics.counters.poll_hits += 1;
    }

    fn complete(&mut self, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32) {
        let h = tag as usize;
        let now = ctx.now;
        let Some(slot) = self.slots.get_mut(h).filter(|s| s.busy) else {
            log::error!("{}: completion for idle slot {h}", self.p.name);
            return;
        };
        let req = slot.req;
        let (popped, kick) = (slot.popped, slot.kick);
        if res == -libc::EOPNOTSUPP && req.kind == RequestType::WriteZeroes && !req.unmap {
            if let Some(io) = self.io.as_mut().filter(|io| io.zero_range) {
                // ZERO_RANGE is not supported by this file system: punch a hole instead.
                io.zero_range = false;
                let e = io.write_zeroes(
                    req.offset(),
                    u64::from(req.num_sectors) << request::SECTOR_SHIFT,
                    true,
                );
                // SAFETY: a fallocate SQE references no memory.
                if unsafe { ctx.push(e, tag) }.is_ok() {
                    return;
                }
            }
        }
        if res == -libc::EINVAL
            && matches!(req.kind, RequestType::In | RequestType::Out)
            && !slot.buffered
        {
            if let Some(io) = self.io.as_ref().filter(|io| io.has_buffered()) {
                // O_DIRECT refused the request (e.g. a host disk with 4 KiB sectors): retry
                // it once through the buffered twin.
                slot.buffered = true;
                let write = req.kind == RequestType::Out;
                let e = io.rw_vectored(write, slot.iov.as_ptr(), req.niov, req.offset(), true);
                // SAFETY: the same iovec array, still owned by the busy slot until this
                // completion comes back.
                if unsafe { ctx.push(e, tag) }.is_ok() {
                    if !self.noted_buffered {
                        self.noted_buffered = true;
                        log::info!("{}: O_DIRECT refused a request; such requests go through the page cache", self.p.name);
                    }
                    return;
                }
            }
        }
        slot.busy = false;
        self.in_flight -= 1;
        let ok = match req.kind {
            RequestType::In | RequestType::Out => res >= 0 && res as u32 == req.data_len,
            _ => res >= 0,
        };
        if !ok && self.log.allow(now, &self.p.name) {
            let why = if res < 0 {
                std::io::Error::from_raw_os_error(-res).to_string()
            } else {
                format!("short transfer of {res} of {} bytes", req.data_len)
            };
            log::warn!(
                "{}: {:?} at sector {} failed: {why}",
                self.p.name,
                req.kind,
                req.sector
            );
        }
        let (status, used) = if ok {
            (VIRTIO_BLK_S_OK, req.used_len_ok())
        } else {
            (VIRTIO_BLK_S_IOERR, 1)
        };
        self.finish(
            tag as u16,
            Some(req.status),
            status,
            used,
            Some((&req, popped, kick)),
            now,
        );
    }

    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let Some(rings) = self.rings.as_mut() else {
            return;
        };
        let Some(idx) = rings.publish() else {
            return;
        };
        self.p.queue.set_next_used(idx);
        if !rings.needs_notification() {
            self.p.metrics.counters.irqs_suppressed += 1;
            return;
        }
        match &self.p.irq {
            Some(irq) => {
                if let Err(e) = irq.write(1) {
                    log::error!("{}: cannot signal the irqfd: {e}", self.p.name);
                }
                self.p.metrics.counters.irqs_sent += 1;
            }
            // No vector: the driver polls the used ring.
            None => self.p.metrics.counters.irqs_suppressed += 1,
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn io_in_flight(&self) -> usize {
        self.in_flight
    }

    fn guest_memory(&self) -> Vec<(*mut u8, usize)> {
        if self.io.is_none() {
            return Vec::new();
        }
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

    fn metrics(&self) -> &QueueMetrics {
        &self.p.metrics
    }
    fn metrics_mut(&mut self) -> &mut QueueMetrics {
        &mut self.p.metrics
    }
}
