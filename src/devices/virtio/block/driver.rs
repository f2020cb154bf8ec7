//! A synthetic virtio driver for tests, benches and the fuzz target: it lays out a split
//! virtqueue in guest memory, writes descriptor chains and avail entries like a guest would,
//! and reads the used ring back. Not used by the VMM itself.

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::request::SECTOR_SIZE;
use crate::devices::virtio::GuestMemory;

pub const F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
pub const F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
pub const F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    pub fn r(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: false,
        }
    }
    pub fn w(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

/// A request the driver built: its head, status byte and data buffer.
#[derive(Debug, Clone, Copy)]
pub struct Built {
    pub head: u16,
    pub status: GuestAddress,
    pub data: GuestAddress,
}

/// Driver side of one split virtqueue.
pub struct TestDriver {
    pub mem: GuestMemory,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    heap: u64,
    heap_end: u64,
}

impl TestDriver {
    /// Lays out a queue of `size` entries at `base`; buffers are allocated from
    /// `base + 64 KiB * ceil(size/256)` up to `heap_end`.
    pub fn new(mem: &GuestMemory, base: GuestAddress, size: u16, heap_end: u64) -> Self {
        let s = u64::from(size);
        let desc = base;
        let avail = GuestAddress(desc.0 + 16 * s);
        let used = GuestAddress((avail.0 + 6 + 2 * s + 3) & !3);
        let heap = (used.0 + 6 + 8 * s + 4095) & !4095;
        let d = TestDriver {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            heap,
            heap_end,
        };
        d.mem.write_obj(0u16, avail).unwrap();
        d.mem.write_obj(0u16, GuestAddress(avail.0 + 2)).unwrap();
        d.mem.write_obj(0u16, used).unwrap();
        d.mem.write_obj(0u16, GuestAddress(used.0 + 2)).unwrap();
        d
    }

    /// The device side of the queue, ready, as the transport would hand it over.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Allocates `len` bytes (512-aligned) of guest memory for buffers.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len.max(1) + SECTOR_SIZE - 1) & !(SECTOR_SIZE - 1);
        assert!(self.heap <= self.heap_end, "test driver heap exhausted");
        GuestAddress(a)
    }

    /// Frees every buffer (for long-running benches that rebuild requests).
    pub fn reset_heap(&mut self, to: GuestAddress) {
        self.heap = to.0;
    }

    /// Writes descriptor `idx` raw (for malformed chains).
    pub fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.desc.0 + 16 * u64::from(idx));
        self.write_desc_at(a, addr, len, flags, next);
    }

    fn write_desc_at(&self, a: GuestAddress, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&b, a).unwrap();
    }

    /// Writes `bufs` as a chain of consecutive descriptors; returns the head (not yet published).
    pub fn write_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = (head as usize + i) % self.size as usize;
            let next = ((idx + 1) % self.size as usize) as u16;
            let mut flags = if b.write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(idx as u16, b.addr.0, b.len, flags, next);
        }
        self.next_desc = ((head as usize + bufs.len()) % self.size as usize) as u16;
        head
    }

    /// Writes `bufs` into an indirect table and one descriptor pointing to it.
    pub fn write_indirect(&mut self, bufs: &[Buf]) -> u16 {
        let table = self.alloc(16 * bufs.len() as u64);
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc_at(
                GuestAddress(table.0 + 16 * i as u64),
                b.addr.0,
                b.len,
                flags,
                (i + 1) as u16,
            );
        }
        let head = self.next_desc;
        self.write_desc(head, table.0, 16 * bufs.len() as u32, F_INDIRECT, 0);
        self.next_desc = (head + 1) % self.size;
        head
    }

    /// Makes `head` available (does not kick).
    pub fn publish(&mut self, head: u16) {
        let slot = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.avail_idx % self.size));
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem
            .store(
                self.avail_idx,
                GuestAddress(self.avail.0 + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    /// Makes all `heads` available with one index update, as a driver batching requests does.
    pub fn publish_many(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.avail_idx % self.size));
            self.mem.write_obj(head, slot).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .store(
                self.avail_idx,
                GuestAddress(self.avail.0 + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    /// Builds a complete request: 16-byte header, one data buffer of `data_len` bytes
    /// (device-writable for IN/GET_ID), status byte. With `indirect`, through an indirect table.
    pub fn request(
        &mut self,
        ty: u32,
        sector: u64,
        data: Option<&[u8]>,
        data_len: u32,
        indirect: bool,
    ) -> Built {
        let hdr = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, hdr).unwrap();
        let dev_writes = matches!(ty, 0 | 8);
        let status = self.alloc(1);
        self.mem.write_obj(0xffu8, status).unwrap();
        let mut bufs = vec![Buf::r(hdr, 16)];
        let mut data_addr = GuestAddress(0);
        if data_len > 0 {
            data_addr = self.alloc(u64::from(data_len));
            if let Some(d) = data {
                self.mem.write_slice(d, data_addr).unwrap();
            }
            bufs.push(Buf {
                addr: data_addr,
                len: data_len,
                write: dev_writes,
            });
        }
        bufs.push(Buf::w(status, 1));
        let head = if indirect {
            self.write_indirect(&bufs)
        } else {
            self.write_chain(&bufs)
        };
        Built {
            head,
            status,
            data: data_addr,
        }
    }

    /// New used entries (id, len) since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self
            .mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.used_seen % self.size));
            let id: u32 = self.mem.read_obj(e).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e.0 + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .unwrap()
    }

    /// Sets `used_event` (EVENT_IDX): the driver wants an interrupt once the used index passes it.
    pub fn set_used_event(&self, v: u16) {
        self.mem
            .store(
                v,
                GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size)),
                Ordering::Release,
            )
            .unwrap();
    }

    /// The status byte of a built request.
    pub fn status(&self, b: &Built) -> u8 {
        self.mem.read_obj(b.status).unwrap()
    }
}
