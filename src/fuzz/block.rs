//! The virtio-blk harness of `fuzz/fuzz_targets/blk_request.rs`, the corpus replay test and
//! the generated-chain test ([`super::chains`]).
//!
//! Input: a flags byte, then an image of guest memory from address 0 (descriptor table,
//! avail ring, used ring, buffers), laid out as [`TestDriver`] lays out a queue. Flags:
//! bit 0 EVENT_IDX, bit 1 read-only disk, bits 2-3 queue size (2, 4, 8, 16), bit 4 an
//! io_uring back end whose operations are answered with made-up results (else the null
//! back end, which completes inline), bit 5 the back end has a buffered twin (O_DIRECT
//! retries), bits 6-7 pick the made-up results.
//!
//! Each input runs through the parser alone (virtio-queue's chain walker and the device's
//! must agree), then through a [`BlockQueue`]: two passes, every queued operation answered.
//! The properties: nothing panics or hangs; every chain popped is answered or the queue is
//! broken; nothing is left in flight; with [`Checks::writes`], the device wrote guest
//! memory only inside device-writable buffers and the used ring.

use std::cell::RefCell;
use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::GuestImage;
use super::MEM_SIZE;
use crate::devices::virtio::block::backend::QueueIo;
use crate::devices::virtio::block::config::DiskInfo;
use crate::devices::virtio::block::driver::TestDriver;
use crate::devices::virtio::block::handler::BlockQueue;
use crate::devices::virtio::block::request::{parse, Chain, Segment, IOVEC_EMPTY};
use crate::devices::virtio::queue::QueueParts;
use crate::devices::virtio::GuestMemory;
use crate::metrics::QueueRecorder;
use crate::reactor::inline::InlineRing;
use crate::reactor::QueueHandler;

/// Disk size of a fuzz case, in sectors.
const CAPACITY: u64 = 64;
/// Made-up results for the back end's operations: full and partial transfers of typical
/// sizes, nothing, and the errors the handler treats specially.
const RESULTS: [i32; 10] = [
    512,
    -libc::EINVAL,
    0,
    4096,
    -libc::EOPNOTSUPP,
    1024,
    -libc::EIO,
    16,
    -libc::ECANCELED,
    513,
];
/// Most operations answered per input (the handler retries each at most twice).
const ANSWER_LIMIT: usize = 3 * 16 * 2;

/// Optional checks (the fuzz targets run them all; they cost a scan of guest memory).
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    pub writes: bool,
}

/// What one input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Chains the handler popped.
    pub popped: usize,
    /// Used entries it wrote.
    pub used: u16,
    /// It gave up on the queue (DEVICE_NEEDS_RESET).
    pub broken: bool,
}

struct Shape {
    size: u16,
    event_idx: bool,
    readonly: bool,
    uring: bool,
    buffered: bool,
    policy: usize,
}

impl Shape {
    fn from_flags(flags: u8) -> Self {
        Shape {
            size: 2u16 << (flags >> 2 & 3),
            event_idx: flags & 1 != 0,
            readonly: flags & 2 != 0,
            uring: flags & 0x10 != 0,
            buffered: flags & 0x20 != 0,
            policy: usize::from(flags >> 6),
        }
    }

    /// Index of the handler serving this shape (all but EVENT_IDX and the results).
    fn key(&self) -> usize {
        (self.size.trailing_zeros() as usize - 1)
            | usize::from(self.readonly) << 2
            | usize::from(self.uring) << 3
            | usize::from(self.buffered) << 4
    }
}

/// Set up once per thread, reset per input.
struct Harness {
    img: GuestImage,
    mem: GuestMemory,
    /// The queue layout of each size (2, 4, 8, 16), as [`TestDriver`] lays it out.
    drivers: Vec<TestDriver>,
    /// The disk of each (size, read-only) for the parser-only pass.
    disks: Vec<DiskInfo>,
    ring: InlineRing,
    scratch: Vec<Segment>,
    iov: Vec<libc::iovec>,
    iov2: Vec<libc::iovec>,
    handlers: Vec<Option<BlockQueue>>,
    kick: EventFd,
    irq: EventFd,
    /// Stands in for the disk: the made-up results mean nothing is ever submitted to it.
    file: Arc<File>,
}

impl Harness {
    fn new() -> Self {
        let img = GuestImage::new();
        let mem = img.mem().clone();
        let drivers = (0..4)
            .map(|k| TestDriver::new(&mem, GuestAddress(0), 2 << k, MEM_SIZE as u64))
            .collect();
        let disks = (0..8)
            .map(|k| DiskInfo::new(CAPACITY, k & 4 != 0, 2 << (k & 3), "fuzz"))
            .collect();
        Harness {
            img,
            mem,
            drivers,
            disks,
            ring: InlineRing::new().expect("an io_uring (Linux 5.19 or newer)"),
            scratch: vec![Segment::default(); 64],
            iov: vec![IOVEC_EMPTY; 64],
            iov2: vec![IOVEC_EMPTY; 64],
            handlers: (0..32).map(|_| None).collect(),
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            file: Arc::new(File::open("/dev/null").expect("/dev/null")),
        }
    }

    fn new_handler(&self, s: &Shape, drv: &TestDriver) -> BlockQueue {
        let disk = Arc::new(DiskInfo::new(CAPACITY, s.readonly, s.size, "fuzz"));
        let parts = QueueParts {
            name: "fuzz-q0".into(),
            mem: self.mem.clone(),
            queue: drv.queue(false),
            kick: self.kick.try_clone().expect("dup"),
            irq: Some(self.irq.try_clone().expect("dup")),
            needs_reset: Arc::new(AtomicBool::new(false)),
            poll: None,
            metrics: QueueRecorder::new("fuzz", 0, 0),
            final_avail: None,
        };
        let io = s.uring.then(|| {
            let alt = s.buffered.then(|| (1, self.file.clone()));
            QueueIo::new(0, self.file.clone(), alt)
        });
        BlockQueue::new(parts, disk, io, [None, None])
    }

    fn run(&mut self, data: &[u8], checks: Checks) -> Option<Outcome> {
        let (&flags, image) = data.split_first()?;
        let s = Shape::from_flags(flags);
        // The queue as the driver lays it out; the image replaces all of memory.
        let drv = &self.drivers[s.size.trailing_zeros() as usize - 1];
        self.img.load(image, drv);
        if checks.writes {
            self.img.allow_writable(image, drv);
        }
        Self::parse_only(
            &self.mem,
            &self.disks[s.key() & 7],
            (&mut self.scratch[..], &mut self.iov[..], &mut self.iov2[..]),
            s.event_idx,
            drv,
        );

        self.ring.clear();
        if self.handlers[s.key()].is_none() {
            self.handlers[s.key()] = Some(self.new_handler(&s, drv));
        }
        let h = self.handlers[s.key()].as_mut().expect("set above");
        h.rearm(drv.queue(s.event_idx));
        let mut popped = 0;
        for pass in 0..2 {
            popped += self.ring.pass(h);
            let mut k = s.policy * 3 + pass;
            self.ring.complete_all(h, ANSWER_LIMIT, |_| {
                k += 1;
                RESULTS[k % RESULTS.len()]
            });
        }
        // Whatever the made-up results left (retries of retries), cancel.
        self.ring
            .complete_all(h, ANSWER_LIMIT, |_| -libc::ECANCELED);
        assert_eq!(self.ring.pending(), 0, "operations left unanswered");
        assert_eq!(
            h.in_flight(),
            0,
            "requests still in flight after every answer"
        );
        let (next_avail, used) = h.progress();
        let out = Outcome {
            popped,
            used,
            broken: h.is_broken(),
        };
        assert_eq!(usize::from(next_avail), popped, "pops the handler reported");
        assert!(
            out.broken || used == next_avail,
            "{popped} chains popped, {used} answered, and the queue is not broken"
        );
        if checks.writes {
            self.img.assert_writes_within(image, drv);
            self.img.check_used_ring(image, drv, used, next_avail);
        }
        Some(out)
    }

    /// The parser alone, over at most two queue lengths of chains: both chain walkers agree.
    fn parse_only(
        mem: &GuestMemory,
        disk: &DiskInfo,
        (scratch, iov, iov2): (&mut [Segment], &mut [libc::iovec], &mut [libc::iovec]),
        event_idx: bool,
        drv: &TestDriver,
    ) {
        let mut q = drv.queue(event_idx);
        for _ in 0..2 * drv.size {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let slow = parse(chain, mem, disk, scratch, iov);
            let fast = Chain::new(mem, GuestAddress(q.desc_table()), q.size(), head);
            let r = parse(fast, mem, disk, scratch, iov2);
            assert_eq!(
                slow, r,
                "the device's chain walker disagrees with virtio-queue's"
            );
            if let Ok(req) = r {
                assert!(req.niov <= iov2.len());
                let total: usize = iov2[..req.niov].iter().map(|v| v.iov_len).sum();
                assert!(
                    total as u64 >= u64::from(req.data_len),
                    "iovecs cover the data"
                );
            }
        }
    }
}

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

/// Runs one input with `checks`; `None` for an empty input. Panics on a broken invariant.
pub fn run(data: &[u8], checks: Checks) -> Option<Outcome> {
    HARNESS.with(|cell| {
        let mut slot = cell.borrow_mut();
        slot.get_or_insert_with(Harness::new).run(data, checks)
    })
}

/// The fuzz target's entry: every check on. Returns the used entries written.
pub fn fuzz_one(data: &[u8]) -> u16 {
    run(data, Checks { writes: true }).map_or(0, |o| o.used)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::super::REGION;
    use super::*;
    use crate::devices::virtio::block::driver::{Buf, F_NEXT};
    use crate::devices::virtio::block::request::*;

    fn corpus_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/blk_request")
    }

    /// Seed inputs: valid requests of every type, plus malformed chains.
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let mut add = |name: &'static str, flags: u8, build: &dyn Fn(&mut TestDriver)| {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 * REGION)]).unwrap();
            let size = 2u16 << (flags >> 2 & 3);
            let mut d = TestDriver::new(&mem, GuestAddress(0), size, 2 * REGION as u64);
            build(&mut d);
            let mut img = vec![0u8; 8192];
            mem.read_slice(&mut img, GuestAddress(0)).unwrap();
            while img.len() > 1 && img[img.len() - 1] == 0 {
                img.pop();
            }
            let mut v = vec![flags];
            v.extend(img);
            out.push((name, v));
        };
        add("read", 12, &|d| {
            let b = d.request(VIRTIO_BLK_T_IN, 1, None, 1024, false);
            d.publish(b.head);
        });
        add("write_indirect_event_idx", 13, &|d| {
            let b = d.request(VIRTIO_BLK_T_OUT, 2, Some(&[7; 512]), 512, true);
            d.publish(b.head);
            let f = d.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
            d.publish(f.head);
        });
        add("get_id_discard_wz", 12, &|d| {
            let b = d.request(VIRTIO_BLK_T_GET_ID, 0, None, 20, false);
            d.publish(b.head);
            let mut p = [0u8; 16];
            p[0..8].copy_from_slice(&8u64.to_le_bytes());
            p[8..12].copy_from_slice(&8u32.to_le_bytes());
            let b = d.request(VIRTIO_BLK_T_DISCARD, 0, Some(&p), 16, false);
            d.publish(b.head);
            let b = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some(&p), 16, false);
            d.publish(b.head);
        });
        add("readonly_write", 14, &|d| {
            let b = d.request(VIRTIO_BLK_T_OUT, 0, Some(&[1; 512]), 512, false);
            d.publish(b.head);
        });
        add("loop", 12, &|d| {
            let h = d.alloc(16);
            d.write_chain(&[Buf::r(h, 16), Buf::w(h, 1)]);
            d.write_desc(1, h.0, 1, F_NEXT | 2, 0);
            d.publish(0);
        });
        add("unknown_type_out_of_disk", 8, &|d| {
            let b = d.request(99, 0, None, 0, false);
            d.publish(b.head);
            let b = d.request(VIRTIO_BLK_T_IN, 1 << 40, None, 512, false);
            d.publish(b.head);
        });
        out
    }

    #[test]
    #[ignore = "writes the seed corpus; run with --ignored after changing the input format"]
    fn generate_seed_corpus() {
        let dir = corpus_dir();
        std::fs::create_dir_all(&dir).unwrap();
        for (name, v) in seeds() {
            std::fs::write(dir.join(name), v).unwrap();
        }
    }

    #[test]
    fn test_block_seeds_answer_expected_chains() {
        let expect = [
            ("read", 1),
            ("write_indirect_event_idx", 2),
            ("get_id_discard_wz", 3),
            ("readonly_write", 1),
            ("loop", 0),
            ("unknown_type_out_of_disk", 2),
        ];
        for ((name, v), (ename, n)) in seeds().into_iter().zip(expect) {
            assert_eq!(name, ename);
            assert_eq!(fuzz_one(&v), n, "seed {name}: used entries");
        }
    }

    #[test]
    fn test_block_corpus_replays_without_panic() {
        let n = super::super::replay_corpus("blk_request", |v| {
            fuzz_one(v);
        });
        assert!(n > 0, "empty corpus");
    }

    #[test]
    fn test_block_mutated_seeds_never_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let base: Vec<Vec<u8>> = seeds().into_iter().map(|s| s.1).collect();
        for i in 0..300 {
            let mut v = base[i % base.len()].clone();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pos = (x as usize) % v.len();
                v[pos] ^= (x >> 32) as u8;
            }
            fuzz_one(&v);
        }
    }
}
