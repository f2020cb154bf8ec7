//! The polled virtio-net driver: one receive and one transmit split queue,
//! a 2 KiB buffer bound to each descriptor for good (receive descriptors may
//! offer less of it, `rxbuf=`). Receive buffers are handed back in place after
//! each frame; a frame over several buffers (MRG_RXBUF) is gathered into one
//! scratch buffer, as Linux's `receive_mergeable` does; transmit descriptors come from two
//! pools, one for control frames (ARP, echo) and one for the flood, so a
//! full ring of UDP never starves an ARP reply.

use ringvm_guests::arch::mmio;
use ringvm_guests::mem::Bump;
use ringvm_guests::netproto::ETH_HLEN;
use ringvm_guests::virtio::net::{HDR_NUM_BUFFERS, HDR_SIZE};
use ringvm_guests::virtio::queue::{SplitQueue, DESC_F_WRITE};

/// Bytes per buffer: the 12-byte header and a 1514-byte frame fit, with room.
pub const BUF_SIZE: u64 = 2048;
/// Largest queue the driver uses (the device's maximum is capped to it).
pub const MAX_QSIZE: u16 = ringvm_guests::bench::netparams::MAX_QSIZE as u16;
/// Transmit descriptors kept for control frames.
const CTRL_SLOTS: u16 = 8;
/// Room for a gathered frame: the largest the device may spread over buffers (64 KiB of
/// GSO payload with its headers).
const SCRATCH_SIZE: u64 = 72 * 1024;
/// `RxFrame::id` of a frame in the scratch buffer (its buffers went back already).
const GATHERED: u16 = u16::MAX;

/// Counters kept by the driver.
#[derive(Default, Clone, Copy)]
pub struct NicStats {
    /// Frames put on the transmit ring / completed by the device.
    pub tx_submitted: u64,
    pub tx_completed: u64,
    /// Frames taken off the receive ring (each counted once, whatever its buffers).
    pub rx_frames: u64,
    /// Frame bytes received (without the virtio header).
    pub rx_bytes: u64,
    /// Frames that spanned more than one buffer (MRG_RXBUF num_buffers > 1), gathered.
    pub rx_multi_buffer: u64,
    /// The most buffers one frame spanned.
    pub rx_max_buffers: u64,
    /// Frames whose later buffers were not in the used ring with the first (the device
    /// must publish them together): dropped.
    pub rx_multi_missing: u64,
    /// Used entries shorter than a header plus an Ethernet header, or longer than the buffer.
    pub rx_bad_len: u64,
    /// Used entries naming a descriptor the driver had not made available.
    pub bad_used: u64,
}

/// A received frame; its buffer is the driver's until `recycle`.
pub struct RxFrame {
    id: u16,
    addr: u64,
    len: usize,
    /// TSC when the poll loop saw it in the used ring.
    pub tsc: u64,
}

impl RxFrame {
    /// The Ethernet frame (virtio header stripped).
    pub fn data(&self) -> &[u8] {
        // The device wrote the buffer before publishing the used entry and leaves it alone
        // until `recycle` (which takes `self`) makes the descriptor available again.
        // SAFETY: `addr..addr+len` lies in a receive buffer this driver allocated (len <= BUF_SIZE)
        // or in the scratch buffer (len <= SCRATCH_SIZE), which only `poll_rx` writes.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

/// A free transmit descriptor and its buffer.
pub struct TxSlot {
    id: u16,
    addr: u64,
}

impl TxSlot {
    /// Room for the frame (after the zeroed virtio header).
    pub fn frame_mut(&mut self) -> &mut [u8] {
        // SAFETY: driver memory the device does not read while the descriptor is off the ring;
        // the slot came off a free list, so no other reference to it exists.
        unsafe { core::slice::from_raw_parts_mut((self.addr + HDR_SIZE as u64) as *mut u8, BUF_SIZE as usize - HDR_SIZE) }
    }
}

pub struct Nic {
    rx: SplitQueue,
    tx: SplitQueue,
    rx_bufs: u64,
    tx_bufs: u64,
    /// Bytes each receive descriptor offers (at most BUF_SIZE).
    rx_len: u32,
    scratch: u64,
    mrg_rxbuf: bool,
    /// Buffers still to drop from a multi-buffer frame.
    merge_skip: u16,
    ctrl_slots: u16,
    ctrl_free: [u16; CTRL_SLOTS as usize],
    nctrl: usize,
    bulk_free: [u16; MAX_QSIZE as usize],
    nbulk: usize,
    /// Descriptors owned by the device (for checking used entries).
    rx_posted: [bool; MAX_QSIZE as usize],
    tx_posted: [bool; MAX_QSIZE as usize],
    pub stats: NicStats,
}

impl Nic {
    /// Allocates buffers and writes every descriptor; receive buffers are
    /// pushed but not published (`start` does that after DRIVER_OK).
    pub fn new(bump: &mut Bump, rx: SplitQueue, tx: SplitQueue, mrg_rxbuf: bool, rx_len: u32) -> Option<Nic> {
        if rx.size > MAX_QSIZE || tx.size > MAX_QSIZE || tx.size < 2 || u64::from(rx_len) > BUF_SIZE {
            return None;
        }
        let rx_bufs = bump.alloc(BUF_SIZE * u64::from(rx.size), 4096)?;
        let scratch = bump.alloc(SCRATCH_SIZE, 4096)?;
        let tx_bufs = bump.alloc(BUF_SIZE * u64::from(tx.size), 4096)?;
        let ctrl_slots = CTRL_SLOTS.min(tx.size / 2);
        let mut nic = Nic {
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            rx_len,
            scratch,
            mrg_rxbuf,
            merge_skip: 0,
            ctrl_slots,
            ctrl_free: [0; CTRL_SLOTS as usize],
            nctrl: 0,
            bulk_free: [0; MAX_QSIZE as usize],
            nbulk: 0,
            rx_posted: [false; MAX_QSIZE as usize],
            tx_posted: [false; MAX_QSIZE as usize],
            stats: NicStats::default(),
        };
        for i in 0..nic.rx.size {
            nic.rx.write_desc(i, nic.rx_addr(i), rx_len, DESC_F_WRITE, 0);
            nic.rx.push(i);
            nic.rx_posted[usize::from(i)] = true;
        }
        for i in 0..nic.tx.size {
            nic.tx.write_desc(i, nic.tx_addr(i), 0, 0, 0);
            nic.free_tx(i);
        }
        Some(nic)
    }

    fn rx_addr(&self, i: u16) -> u64 {
        self.rx_bufs + BUF_SIZE * u64::from(i)
    }

    fn tx_addr(&self, i: u16) -> u64 {
        self.tx_bufs + BUF_SIZE * u64::from(i)
    }

    fn free_tx(&mut self, i: u16) {
        if i < self.ctrl_slots {
            self.ctrl_free[self.nctrl] = i;
            self.nctrl += 1;
        } else {
            self.bulk_free[self.nbulk] = i;
            self.nbulk += 1;
        }
    }

    /// Notify writes issued on both queues.
    pub fn kicks(&self) -> u64 {
        self.rx.kicks + self.tx.kicks
    }

    /// Makes the receive buffers visible (after DRIVER_OK: no notify before it).
    pub fn start(&mut self) {
        self.rx.publish();
    }

    /// A free control-frame transmit descriptor (bulk ones go through `push_bulk`).
    pub fn take_ctrl(&mut self) -> Option<TxSlot> {
        if self.nctrl == 0 {
            return None;
        }
        self.nctrl -= 1;
        let id = self.ctrl_free[self.nctrl];
        Some(TxSlot { id, addr: self.tx_addr(id) })
    }

    /// Puts a filled slot on the ring (visible at the next `flush_tx`).
    pub fn send(&mut self, slot: TxSlot, frame_len: usize) {
        self.tx.write_desc(slot.id, slot.addr, (HDR_SIZE + frame_len) as u32, 0, 0);
        self.tx_posted[usize::from(slot.id)] = true;
        self.tx.push(slot.id);
        self.stats.tx_submitted += 1;
    }

    /// Writes the same frame into every bulk buffer once, so the flood only
    /// pushes descriptor heads. Returns the number of bulk descriptors.
    pub fn fill_bulk(&mut self, mut build: impl FnMut(&mut [u8]) -> usize) -> usize {
        for k in 0..self.nbulk {
            let id = self.bulk_free[k];
            let mut slot = TxSlot { id, addr: self.tx_addr(id) };
            let len = build(slot.frame_mut());
            self.tx.write_desc(id, slot.addr, (HDR_SIZE + len) as u32, 0, 0);
        }
        self.nbulk
    }

    /// Pushes up to `max` prepared bulk frames; returns how many.
    pub fn push_bulk(&mut self, max: u64) -> u64 {
        let mut n = 0;
        while n < max && self.nbulk > 0 {
            self.nbulk -= 1;
            let id = self.bulk_free[self.nbulk];
            self.tx_posted[usize::from(id)] = true;
            self.tx.push(id);
            n += 1;
        }
        self.stats.tx_submitted += n;
        n
    }

    /// Publishes pushed transmit descriptors (kicks if the device asks).
    pub fn flush_tx(&mut self) {
        self.tx.publish();
    }

    /// Takes completed transmissions back; returns how many were bulk frames.
    pub fn reap_tx(&mut self) -> u64 {
        let mut bulk = 0;
        let mut any = false;
        while let Some((id, _)) = self.tx.pop_used() {
            any = true;
            let Some(posted) = self.tx_posted.get_mut(id as usize).filter(|p| **p) else {
                self.stats.bad_used += 1;
                continue;
            };
            *posted = false;
            let id = id as u16;
            if id >= self.ctrl_slots {
                bulk += 1;
            }
            self.free_tx(id);
            self.stats.tx_completed += 1;
        }
        if any {
            self.tx.suppress_interrupts();
        }
        bulk
    }

    /// Transmit descriptors the device holds.
    pub fn tx_in_flight(&self) -> u64 {
        u64::from(self.tx.size) - (self.nctrl + self.nbulk) as u64
    }

    /// The next received frame, if any. A frame over several buffers
    /// (MRG_RXBUF, `num_buffers` > 1) is copied into the scratch buffer and its
    /// buffers are handed back at once.
    pub fn poll_rx(&mut self) -> Option<RxFrame> {
        loop {
            let (id, len) = self.rx.pop_used()?;
            let tsc = ringvm_guests::arch::rdtsc();
            let Some(id) = self.take_posted(id) else {
                continue;
            };
            let addr = self.rx_addr(id);
            if self.merge_skip > 0 {
                self.merge_skip -= 1;
                self.repost(id);
                continue;
            }
            let len = len as usize;
            if len < HDR_SIZE + ETH_HLEN || len > self.rx_len as usize {
                self.stats.rx_bad_len += 1;
                self.repost(id);
                continue;
            }
            self.stats.rx_frames += 1;
            let nbuf = if self.mrg_rxbuf { mmio::read16(addr + HDR_NUM_BUFFERS as u64) } else { 1 };
            if nbuf <= 1 {
                self.stats.rx_bytes += (len - HDR_SIZE) as u64;
                return Some(RxFrame { id, addr: addr + HDR_SIZE as u64, len: len - HDR_SIZE, tsc });
            }
            self.stats.rx_multi_buffer += 1;
            self.stats.rx_max_buffers = self.stats.rx_max_buffers.max(u64::from(nbuf));
            let mut total = 0usize;
            self.gather(addr + HDR_SIZE as u64, len - HDR_SIZE, &mut total);
            self.repost(id);
            let mut ok = true;
            for rest in 1..nbuf {
                let Some((id2, len2)) = self.rx.pop_used() else {
                    // The device published part of a frame: skip the rest when it comes.
                    self.stats.rx_multi_missing += 1;
                    self.merge_skip = nbuf - rest;
                    ok = false;
                    break;
                };
                let Some(id2) = self.take_posted(id2) else {
                    ok = false;
                    continue;
                };
                let len2 = len2 as usize;
                if len2 > self.rx_len as usize || total + len2 > SCRATCH_SIZE as usize {
                    self.stats.rx_bad_len += 1;
                    ok = false;
                } else {
                    self.gather(self.rx_addr(id2), len2, &mut total);
                }
                self.repost(id2);
            }
            if !ok {
                continue;
            }
            self.stats.rx_bytes += total as u64;
            return Some(RxFrame { id: GATHERED, addr: self.scratch, len: total, tsc });
        }
    }

    /// Marks a used descriptor as back from the device; `None` (counted) when the driver
    /// had not made it available.
    fn take_posted(&mut self, id: u32) -> Option<u16> {
        match self.rx_posted.get_mut(id as usize).filter(|p| **p) {
            Some(posted) => {
                *posted = false;
                Some(id as u16)
            }
            None => {
                self.stats.bad_used += 1;
                None
            }
        }
    }

    /// Appends `len` bytes at `from` to the scratch buffer at offset `*at`.
    fn gather(&mut self, from: u64, len: usize, at: &mut usize) {
        if *at + len > SCRATCH_SIZE as usize {
            return;
        }
        // SAFETY: `from..from+len` is a receive buffer the device handed back (len <= rx_len),
        // the destination lies inside the scratch buffer (checked above); they never overlap.
        unsafe { core::ptr::copy_nonoverlapping(from as *const u8, (self.scratch + *at as u64) as *mut u8, len) };
        *at += len;
    }

    /// Gives a frame's buffer back to the device (visible at `flush_rx`); a gathered
    /// frame's buffers went back already.
    pub fn recycle(&mut self, f: RxFrame) {
        if f.id != GATHERED {
            self.repost(f.id);
        }
    }

    fn repost(&mut self, id: u16) {
        self.rx_posted[usize::from(id)] = true;
        self.rx.push(id);
    }

    /// Publishes recycled receive buffers.
    pub fn flush_rx(&mut self) {
        self.rx.publish();
        self.rx.suppress_interrupts();
    }
}
