//! A one-request-at-a-time virtio-blk driver on queue 0 with time limits, for
//! `chaos=1` (which needs to set the device up again after every case) and
//! `verify_only=1`. Not the benchmark's data path: it kicks after every request and
//! watches the device status while it waits.

use ringvm_guests::arch::{mmio, rdtsc};
use ringvm_guests::bench::chaos::Answer;
use ringvm_guests::mem::Bump;
use ringvm_guests::tsc::Clock;
use ringvm_guests::virtio::blk::{self, HEADER_SIZE};
use ringvm_guests::virtio::pci::{TransportError, VirtioPci};
use ringvm_guests::virtio::queue::{SplitQueue, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};
use ringvm_guests::virtio::{self as virtio, status};

/// Data buffer size (one chaos chain of qsize + 2 sectors fits).
pub const DATA_BYTES: u64 = 128 * 1024;
/// Room for indirect tables.
pub const TABLES_BYTES: u64 = 32 * 1024;
/// Status reads while waiting are spaced this far apart (each is a VM exit).
const STATUS_POLL_NS: u64 = 50_000;

/// The driver state; memory is allocated once and reused across resets.
pub struct BlkDev<'d> {
    pub dev: &'d VirtioPci,
    pub features: u64,
    pub q: SplitQueue,
    pub clock: Clock,
    /// Header at +0, status byte at +16, spare bytes after.
    pub meta: u64,
    pub data: u64,
    /// A second data buffer (read-back of a probe write).
    pub data2: u64,
    pub tables: u64,
}

impl<'d> BlkDev<'d> {
    /// Allocates rings and buffers for a `qsize` queue 0. `None` if memory runs out.
    pub fn new(dev: &'d VirtioPci, features: u64, qsize: u16, clock: Clock, bump: &mut Bump) -> Option<Self> {
        let q = SplitQueue::alloc(bump, 0, qsize, features & virtio::F_EVENT_IDX != 0)?;
        Some(BlkDev {
            dev,
            features,
            q,
            clock,
            meta: bump.alloc(4096, 4096)?,
            data: bump.alloc(DATA_BYTES, 4096)?,
            data2: bump.alloc(DATA_BYTES, 4096)?,
            tables: bump.alloc(TABLES_BYTES, 4096)?,
        })
    }

    /// Reset → features → queue 0 → DRIVER_OK, with fresh rings.
    pub fn setup(&mut self) -> Result<(), TransportError> {
        self.dev.reset()?;
        self.dev.add_status(status::ACKNOWLEDGE);
        self.dev.add_status(status::DRIVER);
        self.dev.negotiate(self.features)?;
        self.q.reset_rings();
        let notify = self.dev.setup_queue(0, self.q.size, self.q.desc, self.q.avail, self.q.used)?;
        self.q.set_notify_addr(notify);
        self.dev.add_status(status::DRIVER_OK);
        Ok(())
    }

    pub fn needs_reset(&self) -> bool {
        self.dev.status() & status::NEEDS_RESET != 0
    }

    /// Writes descriptor `i` of the ring.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.q.write_desc(i, addr, len, flags, next);
    }

    /// Writes the request header and presets the status byte to 0xff.
    pub fn header(&self, kind: u32, sector: u64) {
        blk::write_header(self.meta, kind, sector);
        mmio::write8(self.meta + 16, 0xff);
    }

    pub fn status_addr(&self) -> u64 {
        self.meta + 16
    }

    /// Makes `head` available, kicks, and waits up to `timeout_ms` for its answer.
    pub fn submit(&mut self, head: u16, timeout_ms: u64) -> Answer {
        self.q.push(head);
        self.q.publish();
        // Always kick: a hostile case must not depend on notification suppression.
        self.q.kick();
        self.wait(timeout_ms)
    }

    /// Waits for the next used entry or NEEDS_RESET.
    pub fn wait(&mut self, timeout_ms: u64) -> Answer {
        let start = rdtsc();
        let limit = self.clock.ns_to_cycles(timeout_ms * 1_000_000);
        let spacing = self.clock.ns_to_cycles(STATUS_POLL_NS);
        let mut next_status = start;
        loop {
            if let Some((_id, len)) = self.q.pop_used() {
                if self.needs_reset() {
                    return Answer::NeedsReset;
                }
                return match mmio::read8(self.status_addr()) {
                    0xff => Answer::NoStatus(len),
                    s => Answer::Status(s),
                };
            }
            let now = rdtsc();
            if now >= next_status {
                next_status = now + spacing;
                if self.needs_reset() {
                    return Answer::NeedsReset;
                }
            }
            if now.wrapping_sub(start) > limit {
                return Answer::Timeout;
            }
            core::hint::spin_loop();
        }
    }

    /// A normal request on descriptors 0..3: header, `len` bytes at `buf`, status.
    pub fn io(&mut self, kind: u32, sector: u64, buf: u64, len: u32, timeout_ms: u64) -> Answer {
        self.header(kind, sector);
        let dir = if kind == blk::T_IN { DESC_F_WRITE } else { 0 };
        self.desc(0, self.meta, HEADER_SIZE, DESC_F_NEXT, 1);
        self.desc(1, buf, len, DESC_F_NEXT | dir, 2);
        self.desc(2, self.status_addr(), 1, DESC_F_WRITE, 0);
        self.submit(0, timeout_ms)
    }

    /// Address of indirect table `n` (512 bytes = 32 entries each, or one big one at 0).
    pub fn table(&self, n: u64) -> u64 {
        self.tables + n * 32 * DESC_SIZE
    }
}
