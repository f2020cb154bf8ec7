//! A structure-aware generator of descriptor chains, and the stable-toolchain tests that
//! drive ≥ 10^5 of them through the block and the net queue handlers on every `cargo test`.
//!
//! Each case lays out one queue (2 to 16 entries) with a seeded [`Rng`]: mostly valid-ish
//! requests and frames (split over several descriptors, through indirect tables, odd
//! lengths, unknown types, sectors past the disk), and among them the shapes guests get
//! wrong: loops, next indices past the queue, buffers outside guest memory or wrapping the
//! address space, zero and huge lengths, nested and misaligned indirect tables, random flag
//! bits, heads out of range or made available twice, an avail index that runs ahead. The
//! case is then an input of the fuzz harnesses ([`super::block`], [`super::net`]) with every
//! check on: no panic; every chain popped is answered or the queue is broken; nothing left
//! in flight; the used index is the handler's count and names only offered heads; guest
//! memory changed only inside device-writable buffers and the used ring (buffers outside
//! guest memory are refused by `host_range` before any host pointer is formed).

use vm_memory::{Bytes, GuestAddress};

use super::{load_image, Rng, MEM_SIZE};
use crate::devices::virtio::block::driver::{Buf, TestDriver, F_INDIRECT, F_NEXT, F_WRITE};
use crate::devices::virtio::GuestMemory;

/// Which device a case is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Block,
    /// RX, TX or control, as the flags byte says.
    Net,
}

/// Bytes the generator leaves free at the top of guest memory (its heap stops there).
const HEAP_SLACK: u64 = 1024;

/// Builds cases into a scratch guest memory.
pub struct Generator {
    pub rng: Rng,
    mem: GuestMemory,
    image: Vec<u8>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Generator {
            rng: Rng(seed | 1),
            mem: super::guest_memory(),
            image: vec![0u8; MEM_SIZE + 1],
        }
    }

    /// A guest address for a buffer of `len` bytes: mostly from the heap, sometimes out of
    /// guest memory, straddling its end, or wrapping.
    fn addr(&mut self, d: &mut TestDriver, len: u32, left: &mut u64) -> GuestAddress {
        match self.rng.below(40) {
            0 => GuestAddress(MEM_SIZE as u64 + self.rng.below(1 << 20)),
            1 => GuestAddress(u64::MAX - self.rng.below(64)),
            2 => GuestAddress(MEM_SIZE as u64 - self.rng.below(16)),
            _ if u64::from(len) + 512 < *left => {
                *left -= u64::from(len) + 512;
                d.alloc(u64::from(len))
            }
            _ => GuestAddress(MEM_SIZE as u64 - HEAP_SLACK + self.rng.below(512)),
        }
    }

    fn odd_len(&mut self, typical: u32) -> u32 {
        match self.rng.below(24) {
            0 => 0,
            1 => u32::MAX - self.rng.below(4) as u32,
            2 => 1 + self.rng.below(4096) as u32,
            3 => typical + 1,
            _ => typical,
        }
    }

    /// The buffers of one chain for `dev` (`kind`: 0 RX, 1 TX, 2 control for net).
    fn chain_bufs(
        &mut self,
        d: &mut TestDriver,
        dev: Device,
        kind: u8,
        left: &mut u64,
    ) -> Vec<Buf> {
        let mut bufs = Vec::new();
        match (dev, kind) {
            (Device::Block, _) => {
                let ty = [0u32, 1, 4, 8, 11, 13, 99][self.rng.below(7) as usize];
                let sectors = 1 + self.rng.below(8) as u32;
                let len = self.odd_len(512 * sectors);
                let hdr = self.addr(d, 16, left);
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&ty.to_le_bytes());
                let sector = if self.rng.one_in(8) {
                    self.rng.next_u64()
                } else {
                    self.rng.below(80)
                };
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                let _ = d.mem.write_slice(&h, hdr);
                bufs.push(Buf::r(hdr, self.odd_len(16)));
                if ty != 4 && !self.rng.one_in(8) {
                    let data = self.addr(d, len.min(8192), left);
                    if matches!(ty, 11 | 13) {
                        let mut seg = [0u8; 16];
                        seg[0..8].copy_from_slice(&self.rng.below(80).to_le_bytes());
                        seg[8..12].copy_from_slice(&(self.rng.below(16) as u32).to_le_bytes());
                        seg[12..16].copy_from_slice(&(self.rng.below(3) as u32).to_le_bytes());
                        let _ = d.mem.write_slice(&seg, data);
                    }
                    // Split the data over up to three descriptors.
                    let parts = 1 + self.rng.below(3) as u32;
                    let each = len / parts;
                    for p in 0..parts {
                        let a = GuestAddress(data.0.wrapping_add(u64::from(p * each)));
                        let l = if p + 1 == parts { len - each * p } else { each };
                        bufs.push(Buf {
                            addr: a,
                            len: l,
                            write: matches!(ty, 0 | 8) ^ self.rng.one_in(16),
                        });
                    }
                }
                let status = self.addr(d, 1, left);
                bufs.push(Buf::w(status, self.odd_len(1)));
            }
            (Device::Net, 0) => {
                for _ in 0..1 + self.rng.below(3) {
                    let len = self.odd_len(1526);
                    let a = self.addr(d, len.min(2048), left);
                    bufs.push(Buf {
                        addr: a,
                        len,
                        write: !self.rng.one_in(16),
                    });
                }
            }
            (Device::Net, 1) => {
                let hdr = self.addr(d, 12, left);
                let mut h = [0u8; 12];
                if self.rng.one_in(3) {
                    h[0] = self.rng.below(4) as u8;
                    h[1] = [0u8, 1, 3, 4, 0x81, 7][self.rng.below(6) as usize];
                    h[2..4].copy_from_slice(&(self.rng.below(128) as u16).to_le_bytes());
                    h[4..6].copy_from_slice(&(self.rng.below(9000) as u16).to_le_bytes());
                    h[6..8].copy_from_slice(&(self.rng.below(100) as u16).to_le_bytes());
                    h[8..10].copy_from_slice(&(self.rng.below(40) as u16).to_le_bytes());
                }
                let _ = d.mem.write_slice(&h, hdr);
                let split = self.rng.one_in(3);
                let typical = 60 + self.rng.below(1454) as u32;
                let frame = self.odd_len(typical);
                if split {
                    // Header and frame in one buffer.
                    let a = self.addr(d, frame.saturating_add(12).min(2048), left);
                    let _ = d.mem.write_slice(&h, a);
                    bufs.push(Buf::r(a, frame.saturating_add(12)));
                } else {
                    bufs.push(Buf::r(hdr, self.odd_len(12)));
                    for _ in 0..1 + self.rng.below(3) {
                        let a = self.addr(d, frame.min(2048), left);
                        bufs.push(Buf {
                            addr: a,
                            len: frame,
                            write: self.rng.one_in(20),
                        });
                    }
                }
            }
            (Device::Net, _) => {
                let cmd = self.addr(d, 8, left);
                let c = [[4u8, 0], [0, 0], [0, 1], [1, 1], [9, 9]][self.rng.below(5) as usize];
                let pairs = self.rng.below(6) as u16;
                let mut b = [c[0], c[1], 0, 0];
                b[2..4].copy_from_slice(&pairs.to_le_bytes());
                let _ = d.mem.write_slice(&b, cmd);
                bufs.push(Buf::r(cmd, self.odd_len(2)));
                bufs.push(Buf::r(GuestAddress(cmd.0.wrapping_add(2)), self.odd_len(2)));
                let ack = self.addr(d, 1, left);
                bufs.push(Buf::w(ack, self.odd_len(1)));
            }
        }
        bufs
    }

    /// Writes one chain (direct or indirect, maybe malformed); returns its head.
    fn chain(&mut self, d: &mut TestDriver, dev: Device, kind: u8, left: &mut u64) -> u16 {
        let bufs = self.chain_bufs(d, dev, kind, left);
        let indirect = self.rng.one_in(4) && 16 * bufs.len() as u64 + 512 < *left;
        let head = if indirect {
            *left -= 16 * bufs.len() as u64 + 512;
            d.write_indirect(&bufs)
        } else {
            d.write_chain(&bufs)
        };
        let size = d.size;
        match self.rng.below(24) {
            // A loop back to the head.
            0 if bufs.len() > 1 && !indirect => {
                let last = (head + bufs.len() as u16 - 1) % size;
                let b = bufs[bufs.len() - 1];
                d.write_desc(last, b.addr.0, b.len, F_NEXT | F_WRITE, head);
            }
            // Next past the queue.
            1 => {
                let b = bufs[0];
                let flags = if indirect {
                    F_INDIRECT
                } else {
                    F_NEXT | (u16::from(b.write) * F_WRITE)
                };
                d.write_desc(
                    head,
                    b.addr.0,
                    b.len,
                    flags | F_NEXT,
                    size + self.rng.below(8) as u16,
                );
            }
            // Random flag bits on the head (INDIRECT with NEXT, reserved bits, ...).
            2 => {
                let b = bufs[0];
                d.write_desc(
                    head,
                    b.addr.0,
                    b.len,
                    self.rng.next_u64() as u16,
                    (head + 1) % size,
                );
            }
            // An indirect table whose length is not a multiple of 16, or empty, or huge.
            3 if indirect => {
                let mut raw = [0u8; 16];
                let at = GuestAddress(d.desc.0 + 16 * u64::from(head));
                let _ = d.mem.read_slice(&mut raw, at);
                let len = [0u32, 8, 17, !15u32][self.rng.below(4) as usize];
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                let _ = d.mem.write_slice(&raw, at);
            }
            _ => {}
        }
        head
    }

    /// One case: the input bytes for the harness of `dev`.
    pub fn case(&mut self, dev: Device) -> (&[u8], usize) {
        let size_bits = self.rng.below(4) as u8;
        let size = 2u16 << size_bits;
        // Block: EVENT_IDX, read-only, size, back end, buffered twin, results. Net: EVENT_IDX,
        // features, size, queue kind, results.
        let mut flags = (self.rng.next_u64() as u8 & !0x0c) | size_bits << 2;
        if dev == Device::Net && flags >> 4 & 3 == 3 && self.rng.one_in(2) {
            flags &= !0x30; // RX as often as TX
        }
        let kind = match flags >> 4 & 3 {
            0 => 0,
            2 => 2,
            _ => 1,
        };
        load_image(&self.mem, &[]);
        let mut d = TestDriver::new(&self.mem, GuestAddress(0), size, MEM_SIZE as u64);
        let mut left = MEM_SIZE as u64 - 4096 - 2 * HEAP_SLACK;
        let n = 1 + self.rng.below(u64::from(size)) as usize;
        let mut heads = Vec::with_capacity(n);
        for _ in 0..n {
            let h = self.chain(&mut d, dev, kind, &mut left);
            heads.push(match self.rng.below(40) {
                0 => size + self.rng.below(100) as u16,
                1 if !heads.is_empty() => heads[0],
                _ => h,
            });
        }
        d.publish_many(&heads);
        if self.rng.one_in(40) {
            // The avail index runs ahead of the ring.
            let _ = self.mem.write_obj(
                size.wrapping_add(1 + self.rng.below(1000) as u16),
                GuestAddress(d.avail.0 + 2),
            );
        }
        if self.rng.one_in(4) {
            let _ = self.mem.write_obj(self.rng.next_u64() as u16 & 3, d.avail);
            d.set_used_event(self.rng.below(u64::from(size) + 2) as u16);
        }
        self.image[0] = flags;
        self.mem
            .read_slice(&mut self.image[1..], GuestAddress(0))
            .expect("inside guest memory");
        (&self.image, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{block, net};

    /// Descriptor chains each device's test drives (≥ 10^5, the floor).
    const CHAINS: usize = 100_000;

    fn drive(dev: Device, seed: u64) -> (usize, usize, usize) {
        let mut g = Generator::new(seed);
        let (mut chains, mut answered, mut broken) = (0, 0, 0);
        while chains < CHAINS {
            let (input, n) = g.case(dev);
            chains += n;
            let (used, b) = match dev {
                Device::Block => {
                    let o = block::run(input, block::Checks { writes: true }).unwrap();
                    (o.used, o.broken)
                }
                Device::Net => {
                    let o = net::run(input, true).unwrap();
                    (o.used, o.broken)
                }
            };
            answered += usize::from(used);
            broken += usize::from(b);
        }
        (chains, answered, broken)
    }

    #[test]
    fn test_generated_chains_through_block_queue_answered_or_broken() {
        let (chains, answered, broken) = drive(Device::Block, 0x5eed_b10c);
        assert!(chains >= CHAINS);
        // The generator is mostly valid-ish: many chains get an answer, some queues break.
        // A chain without a usable status byte breaks the queue (DEVICE_NEEDS_RESET), and
        // the chains after it in the same input go unanswered: about half are answered.
        assert!(answered > chains / 3, "{answered} of {chains} answered");
        assert!(
            broken > 0,
            "no case broke the queue: the malformed shapes are missing"
        );
    }

    #[test]
    fn test_generated_chains_through_net_queues_answered_or_broken() {
        let (chains, answered, broken) = drive(Device::Net, 0x05ee_d0e7);
        assert!(chains >= CHAINS);
        assert!(answered > chains / 2, "{answered} of {chains} answered");
        assert!(
            broken > 0,
            "no case broke a queue: the malformed shapes are missing"
        );
    }
}
