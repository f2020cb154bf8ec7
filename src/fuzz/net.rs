//! The virtio-net harness of `fuzz/fuzz_targets/net_rx_tx.rs`, the corpus replay test and
//! the generated-chain test ([`super::chains`]).
//!
//! Input: a flags byte, then an image of guest memory from address 0 laid out as
//! [`TestDriver`] lays out a queue. Flags: bit 0 EVENT_IDX, bit 1 the driver acknowledged
//! every offload (CSUM, TSO, UFO, MRG_RXBUF and GUEST_TSO4, so that an RX read spans every
//! chain there is, MQ; else VERSION_1 alone), bits 2-3 queue size
//! (2, 4, 8, 16), bits 4-5 the queue (0 RX, 1 TX, 2 control, 3 TX), bits 6-7 pick the
//! made-up results of the tap reads and writes.
//!
//! There is no tap: the handler's reads and writes are recorded and answered with made-up
//! results (whole frames, truncations, frames with no room for a header, EAGAIN, EFAULT,
//! cancellation), then the stop poll of the drain protocol completes too. The properties:
//! nothing panics or hangs; every chain popped is answered or the queue is broken; nothing
//! is left in flight; the device wrote guest memory only inside device-writable buffers
//! and the used ring.

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::GuestImage;
use super::MEM_SIZE;
use crate::devices::virtio::block::driver::TestDriver;
use crate::devices::virtio::net::config::features as f;
use crate::devices::virtio::net::ctrl::CtrlQueue;
use crate::devices::virtio::net::handler::NetQueueParts;
use crate::devices::virtio::net::pairs::ActivePairs;
use crate::devices::virtio::net::rx::RxQueue;
use crate::devices::virtio::net::tx::TxQueue;
use crate::devices::virtio::queue::{QueueCore, QueueParts};
use crate::devices::virtio::{GuestMemory, F_RING_EVENT_IDX, F_VERSION_1};
use crate::metrics::QueueRecorder;
use crate::reactor::inline::InlineRing;
use crate::reactor::QueueHandler;

/// Made-up results of tap reads (RX) and writes (TX): a full-size frame, the smallest
/// frame, a header alone, less than a header, nothing, more than any buffer, and errors.
const RESULTS: [i32; 11] = [
    1526,
    -libc::EAGAIN,
    72,
    12,
    -libc::EFAULT,
    11,
    0,
    65550,
    -libc::EIO,
    4096,
    -libc::EMSGSIZE,
];
/// Most operations answered with made-up results per input, before the rest is cancelled.
const ANSWER_LIMIT: usize = 96;
/// Queue pairs the control queue may set.
const MAX_PAIRS: u16 = 4;

/// Which handler an input drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rx,
    Tx,
    Ctrl,
}

/// What one input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub kind: Kind,
    /// Chains the handler popped.
    pub popped: u16,
    /// Used entries it wrote.
    pub used: u16,
    /// It stopped serving the queue.
    pub broken: bool,
}

enum Handler {
    Rx(RxQueue),
    Tx(TxQueue),
    Ctrl(CtrlQueue),
}

impl Handler {
    fn as_dyn(&mut self) -> &mut dyn QueueHandler {
        match self {
            Handler::Rx(h) => h,
            Handler::Tx(h) => h,
            Handler::Ctrl(h) => h,
        }
    }

    fn core(&self) -> &QueueCore {
        match self {
            Handler::Rx(h) => &h.core,
            Handler::Tx(h) => &h.core,
            Handler::Ctrl(h) => &h.core,
        }
    }

    fn rearm(&mut self, q: virtio_queue::Queue) {
        match self {
            Handler::Rx(h) => h.rearm(q),
            Handler::Tx(h) => h.rearm(q),
            Handler::Ctrl(h) => h.rearm(q),
        }
    }
}

/// Set up once per thread, reset per input.
struct Harness {
    img: GuestImage,
    mem: GuestMemory,
    /// The queue layout of each size (2, 4, 8, 16), as [`TestDriver`] lays it out.
    drivers: Vec<TestDriver>,
    ring: InlineRing,
    /// One per (size, kind, features).
    handlers: Vec<Option<Handler>>,
    kick: EventFd,
    irq: EventFd,
    stop: EventFd,
}

fn kind_of(flags: u8) -> Kind {
    match flags >> 4 & 3 {
        0 => Kind::Rx,
        2 => Kind::Ctrl,
        _ => Kind::Tx,
    }
}

fn acked(flags: u8) -> u64 {
    let base = F_VERSION_1 | (F_RING_EVENT_IDX * u64::from(flags & 1));
    if flags & 2 == 0 {
        return base;
    }
    base | f::CSUM
        | f::GUEST_CSUM
        | f::GUEST_TSO4
        | f::HOST_TSO4
        | f::HOST_TSO6
        | f::HOST_ECN
        | f::HOST_UFO
        | f::MRG_RXBUF
        | f::CTRL_VQ
        | f::MQ
}

impl Harness {
    fn new() -> Self {
        let img = GuestImage::new();
        let mem = img.mem().clone();
        let drivers = (0..4)
            .map(|k| TestDriver::new(&mem, GuestAddress(0), 2 << k, MEM_SIZE as u64))
            .collect();
        Harness {
            img,
            mem,
            drivers,
            ring: InlineRing::new().expect("an io_uring (Linux 5.19 or newer)"),
            handlers: (0..32).map(|_| None).collect(),
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            stop: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }

    fn new_handler(&self, flags: u8, drv: &TestDriver) -> Handler {
        let kind = kind_of(flags);
        let parts = NetQueueParts {
            queue: QueueParts {
                name: format!("fuzz-{kind:?}"),
                mem: self.mem.clone(),
                queue: drv.queue(false),
                kick: self.kick.try_clone().expect("dup"),
                irq: Some(self.irq.try_clone().expect("dup")),
                needs_reset: Arc::new(AtomicBool::new(false)),
                poll: None,
                metrics: QueueRecorder::new("fuzz", 0, 0),
                final_avail: None,
            },
            acked: acked(flags),
            tap_fd: None,
            fixed: 0,
            stop: self.stop.try_clone().expect("dup"),
        };
        match kind {
            Kind::Rx => Handler::Rx(RxQueue::new(parts)),
            Kind::Tx => Handler::Tx(TxQueue::new(parts)),
            Kind::Ctrl => Handler::Ctrl(CtrlQueue::new(
                parts,
                MAX_PAIRS,
                Arc::new(ActivePairs::without_tap()),
            )),
        }
    }

    fn run(&mut self, data: &[u8], writes: bool) -> Option<Outcome> {
        let (&flags, image) = data.split_first()?;
        let kind = kind_of(flags);
        // The queue as the driver lays it out; the image replaces all of memory.
        let drv = &self.drivers[usize::from(flags >> 2 & 3)];
        self.img.load(image, drv);
        if writes {
            self.img.allow_writable(image, drv);
        }
        // Features, queue size and kind pick the handler; EVENT_IDX is the queue's.
        let key = usize::from(flags >> 2 & 3) | usize::from(flags & 2) << 1 | (kind as usize) << 3;
        self.ring.clear();
        if self.handlers[key].is_none() {
            self.handlers[key] = Some(self.new_handler(flags, drv));
        }
        let h = self.handlers[key].as_mut().expect("set above");
        h.rearm(drv.queue(flags & 1 != 0));
        let policy = usize::from(flags >> 6);
        for pass in 0..2 {
            self.ring.pass(h.as_dyn());
            let mut k = policy * 3 + pass;
            self.ring.complete_all(h.as_dyn(), ANSWER_LIMIT, |_| {
                k += 1;
                RESULTS[k % RESULTS.len()]
            });
        }
        // The device resets: the stop poll fires, the posted reads are cancelled.
        self.ring
            .complete_all(h.as_dyn(), ANSWER_LIMIT, |_| -libc::ECANCELED);
        assert_eq!(self.ring.pending(), 0, "operations left unanswered");
        assert_eq!(
            h.as_dyn().in_flight(),
            0,
            "operations still in flight after every answer"
        );
        let (popped, used) = h.core().progress();
        let out = Outcome {
            kind,
            popped,
            used,
            broken: h.core().is_broken(),
        };
        assert!(
            out.broken || used == popped,
            "{kind:?}: {popped} chains popped, {used} answered, and the queue is not broken"
        );
        if writes {
            self.img.assert_writes_within(image, drv);
            self.img.check_used_ring(image, drv, used, popped);
        }
        Some(out)
    }
}

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

/// Runs one input; `writes` also checks where the device wrote. `None` for an empty input.
/// Panics on a broken invariant.
pub fn run(data: &[u8], writes: bool) -> Option<Outcome> {
    HARNESS.with(|cell| {
        let mut slot = cell.borrow_mut();
        slot.get_or_insert_with(Harness::new).run(data, writes)
    })
}

/// The fuzz target's entry: every check on.
pub fn fuzz_one(data: &[u8]) {
    let _ = run(data, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::driver::Buf;
    use crate::devices::virtio::net::frame::VnetHdr;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// Seed inputs: an RX buffer, TX frames (with and without offloads), control commands.
    pub(crate) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        let mut add = |name: &'static str, flags: u8, build: &dyn Fn(&mut TestDriver)| {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let size = 2u16 << (flags >> 2 & 3);
            let mut d = TestDriver::new(&mem, GuestAddress(0), size, MEM_SIZE as u64);
            build(&mut d);
            let mut img = vec![0u8; 16384];
            mem.read_slice(&mut img, GuestAddress(0)).unwrap();
            while img.len() > 1 && img[img.len() - 1] == 0 {
                img.pop();
            }
            let mut v = vec![flags];
            v.extend(img);
            out.push((name, v));
        };
        add("rx_two_buffers", 0x0c | 2, &|d| {
            for _ in 0..2 {
                let b = d.alloc(1526);
                let h = d.write_chain(&[Buf::w(b, 1526)]);
                d.publish(h);
            }
        });
        add("tx_frame", 0x1c, &|d| {
            let hdr = d.alloc(12);
            let frame = d.alloc(60);
            d.mem.write_slice(&[0xffu8; 60], frame).unwrap();
            let h = d.write_chain(&[Buf::r(hdr, 12), Buf::r(frame, 60)]);
            d.publish(h);
        });
        add("tx_gso_indirect", 0x1d | 2, &|d| {
            let hdr = d.alloc(12);
            let h = VnetHdr {
                flags: 1,
                gso_type: 1,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            };
            d.mem.write_slice(&h.to_bytes(), hdr).unwrap();
            let frame = d.alloc(3000);
            let head = d.write_indirect(&[Buf::r(hdr, 12), Buf::r(frame, 3000)]);
            d.publish(head);
        });
        add("ctrl_mq_pairs", 0x2c | 2, &|d| {
            let cmd = d.alloc(4);
            d.mem.write_slice(&[4, 0, 2, 0], cmd).unwrap();
            let ack = d.alloc(1);
            let h = d.write_chain(&[
                Buf::r(cmd, 2),
                Buf::r(GuestAddress(cmd.0 + 2), 2),
                Buf::w(ack, 1),
            ]);
            d.publish(h);
        });
        add("rx_loop", 0x08, &|d| {
            let b = d.alloc(64);
            d.write_chain(&[Buf::w(b, 64), Buf::w(b, 64)]);
            d.write_desc(1, b.0, 64, 1 | 2, 0);
            d.publish(0);
        });
        out
    }

    #[test]
    #[ignore = "writes the seed corpus; run with --ignored after changing the input format"]
    fn generate_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/net_rx_tx");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, v) in seeds() {
            std::fs::write(dir.join(name), v).unwrap();
        }
    }

    #[test]
    fn test_net_seeds_answer_every_chain() {
        for (name, v) in seeds() {
            let o = run(&v, true).unwrap();
            assert!(!o.broken || name == "rx_loop", "seed {name}: {o:?}");
            assert_eq!(o.used, o.popped, "seed {name}: {o:?}");
        }
    }

    #[test]
    fn test_net_tx_frame_written_once_with_exact_result() {
        let (_, v) = seeds().into_iter().find(|s| s.0 == "tx_frame").unwrap();
        let o = run(&v, true).unwrap();
        assert_eq!(
            (o.kind, o.popped, o.used, o.broken),
            (Kind::Tx, 1, 1, false)
        );
    }

    #[test]
    fn test_net_corpus_replays_without_panic() {
        let n = super::super::replay_corpus("net_rx_tx", fuzz_one);
        assert!(n > 0, "empty corpus");
    }
}
