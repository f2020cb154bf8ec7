//! The fuzz entry point shared by `fuzz/fuzz_targets/blk_request.rs` and the corpus replay
//! test: the input is a flags byte followed by an image of the first guest pages (descriptor
//! table, avail ring, used ring, buffers), laid out as [`TestDriver`] lays out a queue.
//!
//! Each input runs twice: through the parser alone (every chain the queue yields), then
//! through a [`BlockQueue`] on an inline reactor with the null back end (pop, parse, status,
//! used ring, EVENT_IDX, interrupt). The property is that nothing panics, hangs or writes
//! outside guest memory, and that both chain walkers agree.

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::DiskInfo;
use super::driver::TestDriver;
use super::handler::{BlockQueue, QueueParts};
use super::request::{parse, Chain, Segment, IOVEC_EMPTY};
use crate::metrics::QueueMetrics;
use crate::reactor::{AttachCtx, LocalControl, QueueHandler, Reactor, ReactorOptions};

/// Guest memory of a fuzz case: two regions, so buffers may straddle a boundary.
const REGION: usize = 32 << 10;
/// Disk size of a fuzz case, in sectors.
const CAPACITY: u64 = 64;

fn setup(data: &[u8]) -> Option<(GuestMemoryMmap<()>, TestDriver, bool, bool)> {
    let (&flags, image) = data.split_first()?;
    let size = 2u16 << (flags >> 2 & 3); // 2, 4, 8 or 16
    let event_idx = flags & 1 != 0;
    let readonly = flags & 2 != 0;
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ])
    .ok()?;
    let drv = TestDriver::new(&mem, GuestAddress(0), size, 2 * REGION as u64);
    let n = image.len().min(2 * REGION);
    mem.write_slice(&image[..n], GuestAddress(0)).ok()?;
    // The used ring belongs to the device: start it clean so the published count is ours.
    let used_len = 6 + 8 * usize::from(size);
    mem.write_slice(&vec![0u8; used_len], drv.used).ok()?;
    Some((mem, drv, event_idx, readonly))
}

/// Runs one fuzz input and returns how many used entries the handler published. Panics only
/// on a broken invariant.
pub fn fuzz_one(data: &[u8]) -> u16 {
    let Some((mem, drv, event_idx, readonly)) = setup(data) else {
        return 0;
    };
    let disk = Arc::new(DiskInfo {
        readonly,
        ..DiskInfo::new(CAPACITY, readonly, drv.size, "fuzz")
    });

    // 1. The parser alone, over at most two queue lengths of chains.
    let mut q = drv.queue(event_idx);
    let mut scratch = vec![Segment::default(); disk.seg_max as usize + 2];
    let mut iov = vec![IOVEC_EMPTY; disk.seg_max as usize + 8];
    let mut iov2 = iov.clone();
    for _ in 0..2 * drv.size {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let slow = parse(chain, &mem, &disk, &mut scratch, &mut iov);
        let fast = Chain::new(&mem, GuestAddress(q.desc_table()), q.size(), head);
        let r = parse(fast, &mem, &disk, &mut scratch, &mut iov2);
        assert_eq!(
            slow, r,
            "the device's chain walker disagrees with virtio-queue's"
        );
        if let Ok(req) = r {
            let total: usize = iov2[..req.niov].iter().map(|v| v.iov_len).sum();
            assert!(req.niov <= iov2.len());
            assert!(
                total as u64 >= u64::from(req.data_len),
                "iovecs cover the data"
            );
        }
    }

    // 2. The queue handler on an inline reactor (same input, fresh memory).
    let Some((mem, drv, event_idx, _)) = setup(data) else {
        return 0;
    };
    let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let parts = QueueParts {
        name: "fuzz-q0".into(),
        mem: mem.clone(),
        queue: drv.queue(event_idx),
        kick: kick.try_clone().expect("dup"),
        irq: Some(irq),
        disk,
        needs_reset: Arc::new(AtomicBool::new(false)),
        poll: None,
        metrics: QueueMetrics::new("fuzz", 0, 0),
        final_avail: None,
    };
    // One reactor per thread, reused across inputs: ring setup would dominate otherwise.
    thread_local! {
        static REACTOR: RefCell<Option<(Reactor, LocalControl)>> = const { RefCell::new(None) };
    }
    REACTOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Reactor::new_local(&ReactorOptions {
                ring_entries: 32,
                ..Default::default()
            })
            .ok();
        }
        let Some((reactor, _)) = slot.as_mut() else {
            return;
        };
        let factory = Box::new(move |_: AttachCtx| {
            Ok(Box::new(BlockQueue::new(parts, None, [None, None])) as Box<dyn QueueHandler>)
        });
        if reactor.attach_local(0, factory).is_err() {
            *slot = None;
            return;
        }
        let _ = kick.write(1);
        for _ in 0..4 {
            if reactor.turn_nowait().is_err() {
                break;
            }
        }
        if reactor.detach_local(0, 1000).is_err() {
            *slot = None;
        }
    });
    // Every used entry names a valid head by construction (Rings::push_used debug-asserts
    // it; fuzz builds enable debug assertions). The entries themselves are not checked here:
    // a guest may point its own buffers at the used ring.
    let used_idx: u16 = mem.read_obj(GuestAddress(drv.used.0 + 2)).unwrap_or(0);
    used_idx
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
    fn test_fuzz_seeds_run_clean() {
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
    fn test_fuzz_corpus_replays_without_panic() {
        let Ok(dir) = std::fs::read_dir(corpus_dir()) else {
            panic!("corpus missing at {}", corpus_dir().display())
        };
        let mut n = 0;
        for e in dir {
            let p = e.unwrap().path();
            fuzz_one(&std::fs::read(&p).unwrap());
            n += 1;
        }
        assert!(n > 0, "empty corpus");
    }

    #[test]
    fn test_fuzz_random_inputs_never_panic() {
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
