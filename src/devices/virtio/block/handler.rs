//! The virtio-blk half of a queue ([`BlockRequests`], joined with the shared
//! [`QueueCore`] as a [`BlockQueue`]): it takes chains from the core, hands them to the
//! parser, turns parsed requests into back-end operations and completes them. It never
//! parses and never touches the rings.
//!
//! Request slots (with their iovec arrays) are allocated when the queue is attached and
//! indexed by descriptor head, so the data path allocates nothing; a completion writes the
//! status byte and gives the used entry to the core, which publishes the used index and
//! decides the interrupt once per batch.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddress;

use super::backend::QueueIo;
use super::config::DiskInfo;
use super::request::{
    self, Request, RequestError, RequestType, Segment, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use crate::devices::virtio::queue::{
    host_range, DeviceQueue, QueueCore, QueueParts, Slots, Virtqueue,
};
use crate::reactor::RingCtx;

/// Extra iovecs beyond seg_max, for buffers that straddle guest memory regions.
const IOV_SLACK: usize = 8;

/// A virtio-blk queue served by a reactor.
pub type BlockQueue = Virtqueue<BlockRequests>;

/// What a slot holds for a block request.
#[derive(Clone, Copy)]
struct BlockReq {
    req: Request,
    /// Served through the buffered twin of an O_DIRECT disk.
    buffered: bool,
}

impl Default for BlockReq {
    fn default() -> Self {
        BlockReq {
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
            buffered: false,
        }
    }
}

/// How a request ended, for [`BlockRequests::finish`].
struct Done {
    head: u16,
    status_at: Option<GuestAddress>,
    status: u8,
    used_len: u32,
    /// The request with its pop and kick times (`None`: it did not parse).
    req: Option<(Request, Instant, Instant)>,
}

/// The virtio-blk requests of one queue.
pub struct BlockRequests {
    disk: Arc<DiskInfo>,
    io: Option<QueueIo>,
    /// Disk file and its buffered twin, registered by the reactor.
    files: [Option<RawFd>; 2],
    slots: Slots<BlockReq>,
    scratch: Box<[Segment]>,
    /// The notice about O_DIRECT fallbacks was logged.
    noted_buffered: bool,
}

impl BlockQueue {
    /// Builds the queue state; call on the reactor thread. `io` is `None` for the null back
    /// end; `files` are the disk file and its buffered twin, which the reactor registers.
    pub fn new(
        p: QueueParts,
        disk: Arc<DiskInfo>,
        io: Option<QueueIo>,
        files: [Option<RawFd>; 2],
    ) -> Self {
        let segs = disk.seg_max as usize + 2;
        let slots = Slots::new(&p, segs + IOV_SLACK);
        Virtqueue {
            core: QueueCore::new(p),
            dev: BlockRequests {
                disk,
                io,
                files,
                slots,
                scratch: vec![Segment::default(); segs].into_boxed_slice(),
                noted_buffered: false,
            },
        }
    }

    /// (chains popped, used entries written) since the queue was set up.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn progress(&self) -> (u16, u16) {
        self.core.progress()
    }

    /// The queue stopped serving until the device is reset.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn is_broken(&self) -> bool {
        self.core.is_broken()
    }
}

impl BlockRequests {
    /// Writes the status byte, gives the used entry back and records metrics.
    fn finish(core: &mut QueueCore, d: Done, now: Instant) {
        if let Some(at) = d.status_at {
            let Some(p) = host_range(core.mem(), at.0, 1) else {
                core.fail("cannot write a status byte", now);
                return;
            };
            // SAFETY: `host_range` checked that the byte lies in mapped guest memory, which
            // the core's `mem` keeps mapped.
            unsafe { std::ptr::write_volatile(p, d.status) };
        }
        core.push_used(d.head, d.used_len);
        let m = core.metrics_mut();
        let c = &mut m.counters;
        match d.status {
            VIRTIO_BLK_S_OK => {}
            VIRTIO_BLK_S_UNSUPP => c.unsupported += 1,
            _ => c.errors += 1,
        }
        let Some((req, popped, kick)) = d.req else {
            return;
        };
        let ok = d.status == VIRTIO_BLK_S_OK;
        if d.status != VIRTIO_BLK_S_UNSUPP {
            let bytes = if ok { u64::from(req.data_len) } else { 0 };
            match req.kind {
                RequestType::In => {
                    c.reads += 1;
                    c.bytes_read += bytes;
                }
                RequestType::Out => {
                    c.writes += 1;
                    c.bytes_written += bytes;
                }
                RequestType::Flush => c.flushes += 1,
                RequestType::GetId => c.get_ids += 1,
                RequestType::Discard => c.discards += 1,
                RequestType::WriteZeroes => c.write_zeroes += 1,
            }
        }
        m.record_service(now.saturating_duration_since(popped));
        m.record_k2c(now.saturating_duration_since(kick));
    }

    /// Copies the disk's serial into a GET_ID request's buffers.
    fn write_id(&mut self, head: u16, req: &Request) {
        let mut left = &self.disk.id[..req.data_len as usize];
        for v in &self.slots.get_mut(head).iov[..req.niov] {
            let take = v.iov_len.min(left.len());
            // SAFETY: the parser checked that this iovec lies inside guest memory, which the
            // core keeps mapped; `left` is a host buffer that cannot overlap it.
            unsafe { std::ptr::copy_nonoverlapping(left.as_ptr(), v.iov_base.cast::<u8>(), take) };
            left = &left[take..];
        }
    }

    /// Starts one parsed request: completes it inline or queues its SQE.
    fn start(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, head: u16, kick: Instant) {
        let now = ctx.now;
        let req = self.slots.get_mut(head).req.req;
        let buffered = req.unaligned && self.io.as_ref().is_some_and(QueueIo::has_buffered);
        let sectors_len = u64::from(req.num_sectors) << request::SECTOR_SHIFT;
        if req.kind == RequestType::GetId {
            self.write_id(head, &req);
        }
        let slot = self.slots.get_mut(head);
        slot.req.buffered = buffered;
        let entry = match (&self.io, req.kind) {
            (_, RequestType::GetId) | (None, _) => None,
            (Some(_), RequestType::In | RequestType::Out) if req.niov == 0 => None,
            (Some(io), RequestType::In | RequestType::Out) => {
                let iov = &slot.iov;
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
            (Some(io), RequestType::Discard) => Some(io.punch(req.offset(), sectors_len)),
            (Some(io), RequestType::WriteZeroes) => {
                Some(io.write_zeroes(req.offset(), sectors_len, req.unmap))
            }
        };
        let done = |status, used_len| Done {
            head,
            status_at: Some(req.status),
            status,
            used_len,
            req: Some((req, now, kick)),
        };
        let Some(entry) = entry else {
            Self::finish(core, done(VIRTIO_BLK_S_OK, req.used_len_ok()), now);
            return;
        };
        // SAFETY: the entry points at the slot's iovecs and the guest buffers they name,
        // which the core's `mem` keeps mapped until the reactor drops the drained queue.
        if let Err(e) = unsafe { self.slots.submit(ctx, head, entry, kick) } {
            if core.may_log(now) {
                log::error!("{}: cannot submit a request: {e}", core.name());
            }
            Self::finish(core, done(VIRTIO_BLK_S_IOERR, 1), now);
        }
    }

    /// A chain the parser refused: answered with its status when it has a usable status
    /// byte, else the device asks for a reset.
    fn refuse(core: &mut QueueCore, head: u16, e: &RequestError, now: Instant) {
        if core.may_log(now) {
            log::warn!("{}: bad request (head {head}): {}", core.name(), e.error);
        }
        match e.status {
            Some(at) => {
                let d = Done {
                    head,
                    status_at: Some(at),
                    status: e.error.status(),
                    used_len: 1,
                    req: None,
                };
                Self::finish(core, d, now);
            }
            // A loop, a bad indirect table, a status byte outside RAM or not writable: there
            // is no status to answer with, and a used entry alone would let the driver read a
            // stale status as success. The device asks for a reset instead, as QEMU does
            // (virtio 1.2, 2.1.2).
            None => core.fail(&format!("head {head} cannot be answered: {}", e.error), now),
        }
    }
}

impl DeviceQueue for BlockRequests {
    fn file_fd(&self) -> Option<RawFd> {
        self.files[0]
    }

    fn alt_file_fd(&self) -> Option<RawFd> {
        self.files[1]
    }

    fn uses_fixed_buffers(&self) -> bool {
        self.io.is_some()
    }

    fn pop(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        let kick = core.take_kick(ctx.now);
        core.avail(ctx.now);
        let mut n = 0;
        while n < budget {
            let Some(head) = core.pop(ctx.now, |h| self.slots.is_busy(h)) else {
                break;
            };
            n += 1;
            let slot = self.slots.get_mut(head);
            let parsed = request::parse(
                core.chain(head),
                core.mem(),
                &self.disk,
                &mut self.scratch,
                &mut slot.iov,
            );
            match parsed {
                Ok(req) => {
                    slot.req.req = req;
                    self.start(core, ctx, head, kick);
                }
                Err(e) => Self::refuse(core, head, &e, ctx.now),
            }
        }
        n
    }

    fn complete(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32) {
        let now = ctx.now;
        let Some(slot) = self.slots.busy_mut(tag) else {
            log::error!("{}: completion for idle slot {tag}", core.name());
            return;
        };
        let BlockReq { req, buffered } = slot.req;
        if res < 0 {
            let iov = slot.iov.as_ptr();
            if let Some(retry) = self
                .io
                .as_mut()
                .and_then(|io| io.retry(&req, iov, buffered, res))
            {
                // SAFETY: the same iovec array (or none), still owned by the busy slot until
                // this completion comes back.
                if unsafe { ctx.push(retry.entry, tag) }.is_ok() {
                    slot.req.buffered = retry.buffered;
                    if retry.buffered && !std::mem::replace(&mut self.noted_buffered, true) {
                        log::info!("{}: O_DIRECT refused a request; such requests go through the page cache", core.name());
                    }
                    return;
                }
            }
        }
        let Some(slot) = self.slots.complete(tag) else {
            return;
        };
        let (popped, kick) = (slot.popped, slot.kick);
        let ok = match req.kind {
            RequestType::In | RequestType::Out => res >= 0 && res as u32 == req.data_len,
            _ => res >= 0,
        };
        if !ok && core.may_log(now) {
            let why = if res < 0 {
                std::io::Error::from_raw_os_error(-res).to_string()
            } else {
                format!("short transfer of {res} of {} bytes", req.data_len)
            };
            log::warn!(
                "{}: {:?} at sector {} failed: {why}",
                core.name(),
                req.kind,
                req.sector
            );
        }
        let (status, used_len) = if ok {
            (VIRTIO_BLK_S_OK, req.used_len_ok())
        } else {
            (VIRTIO_BLK_S_IOERR, 1)
        };
        let d = Done {
            head: tag as u16,
            status_at: Some(req.status),
            status,
            used_len,
            req: Some((req, popped, kick)),
        };
        Self::finish(core, d, now);
    }

    fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    fn io_in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    #[cfg(any(test, feature = "fuzz"))]
    fn rearm(&mut self) {
        self.slots.clear();
        if let Some(io) = self.io.as_mut() {
            io.zero_range = true;
        }
    }
}
