//! Device tests: a synthetic driver, real reactors, files in /tmp (buffered where /tmp is
//! tmpfs) and under target/ (O_DIRECT). Request handling here; lifecycle (reset, activation,
//! polling, failures, pools) in `lifecycle.rs`.

mod lifecycle;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver::{Buf, Built, TestDriver};
use super::request::*;
use super::*;
use crate::reactor::{ReactorOptions, ReactorPool};
use crate::vmm::exit::ExitHandle;

const MEM: usize = 32 << 20;
/// Each queue's driver owns 4 MiB of guest memory.
const QUEUE_SPAN: u64 = 4 << 20;
const WAIT: Duration = Duration::from_secs(5);

struct Q {
    drv: TestDriver,
    kick: EventFd,
    irq: Option<EventFd>,
}

struct Harness {
    pool: Option<ReactorPool>,
    dev: BlockDevice,
    mem: GuestMemory,
    qs: Vec<Q>,
    _file: Option<tempfile::NamedTempFile>,
}

fn pool(n: usize) -> ReactorPool {
    let cores = (0..n).map(|i| i % 2).collect();
    ReactorPool::start(
        ReactorOptions {
            cores,
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    )
    .unwrap()
}

fn image(dir: Option<&Path>, sectors: u64) -> tempfile::NamedTempFile {
    let mut f = match dir {
        Some(d) => tempfile::NamedTempFile::new_in(d).unwrap(),
        None => tempfile::NamedTempFile::new().unwrap(),
    };
    let pattern: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
    f.write_all(&pattern).unwrap();
    f.flush().unwrap();
    f
}

struct Opts<'a> {
    cfg: &'a str,
    reactors: usize,
    event_idx: bool,
    irq: bool,
    file: Option<tempfile::NamedTempFile>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            cfg: "",
            reactors: 1,
            event_idx: false,
            irq: true,
            file: None,
        }
    }
}

fn harness(o: Opts<'_>) -> Harness {
    let cfg_s = match &o.file {
        Some(f) => format!("path={},{}", f.path().display(), o.cfg),
        None => o.cfg.to_string(),
    };
    let cfg: DiskConfig = cfg_s.parse().unwrap();
    let pool = pool(o.reactors);
    let mut dev = BlockDevice::new(&cfg, &pool).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut qs = Vec::new();
    let mut active = Vec::new();
    for i in 0..cfg.queues {
        let base = u64::from(i) * QUEUE_SPAN + 0x1000;
        let drv = TestDriver::new(
            &mem,
            GuestAddress(base),
            cfg.queue_size,
            base - 0x1000 + QUEUE_SPAN,
        );
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = o.irq.then(|| EventFd::new(EFD_NONBLOCK).unwrap());
        active.push(ActiveQueue {
            index: i,
            queue: drv.queue(o.event_idx),
            kick: kick.try_clone().unwrap(),
            irq: irq.as_ref().map(|e| e.try_clone().unwrap()),
        });
        qs.push(Q { drv, kick, irq });
    }
    dev.activate(mem.clone(), dev.features(), active).unwrap();
    Harness {
        pool: Some(pool),
        dev,
        mem,
        qs,
        _file: o.file,
    }
}

impl Harness {
    fn submit(&mut self, q: usize, heads: &[u16]) {
        for &h in heads {
            self.qs[q].drv.publish(h);
        }
        self.qs[q].kick.write(1).unwrap();
    }

    /// Waits until the used index reaches `n` entries in total.
    fn wait_used(&mut self, q: usize, n: u16) {
        let t = Instant::now();
        while self.qs[q].drv.used_idx() < n {
            assert!(
                t.elapsed() < WAIT,
                "queue {q}: used index {} never reached {n}",
                self.qs[q].drv.used_idx()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn run_one(&mut self, q: usize, b: &Built) -> (u8, u32) {
        let before = self.qs[q].drv.used_idx();
        self.submit(q, &[b.head]);
        self.wait_used(q, before + 1);
        let used = self.qs[q].drv.take_used();
        let e = used
            .iter()
            .find(|e| e.0 == u32::from(b.head))
            .copied()
            .expect("head in used ring");
        (self.qs[q].drv.status(b), e.1)
    }

    fn irq_count(&self, q: usize) -> u64 {
        self.qs[q]
            .irq
            .as_ref()
            .and_then(|e| e.read().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) -> crate::metrics::Report {
        self.dev.reset();
        self.pool.take().unwrap().stop().unwrap()
    }
}

fn read_file(f: &impl AsRef<Path>, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut h = std::fs::File::open(f.as_ref()).unwrap();
    h.seek(SeekFrom::Start(off)).unwrap();
    h.read_exact(&mut v).unwrap();
    v
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

#[test]
fn test_write_then_read_round_trips_through_file() {
    let mut h = harness(Opts {
        file: Some(image(None, 64)),
        cfg: "direct=off",
        ..Default::default()
    });
    let data = pattern(3, 4096);
    let w = h.qs[0]
        .drv
        .request(VIRTIO_BLK_T_OUT, 8, Some(&data), 4096, false);
    assert_eq!(h.run_one(0, &w), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(read_file(h._file.as_ref().unwrap(), 8 * 512, 4096), data);
    let r = h.qs[0].drv.request(VIRTIO_BLK_T_IN, 8, None, 4096, false);
    assert_eq!(h.run_one(0, &r), (VIRTIO_BLK_S_OK, 4097));
    let mut back = vec![0u8; 4096];
    h.mem.read_slice(&mut back, r.data).unwrap();
    assert_eq!(back, data);
    let rep = h.stop();
    assert_eq!(
        (rep.queues[0].counters.reads, rep.queues[0].counters.writes),
        (1, 1)
    );
    assert_eq!(rep.queues[0].counters.bytes_read, 4096);
    assert_eq!(rep.queues[0].kick_to_complete.len(), 2);
}

#[test]
fn test_direct_io_on_disk_backed_dir_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let f = image(Some(&dir), 64);
    let mut h = harness(Opts {
        file: Some(f),
        ..Default::default()
    });
    let data = pattern(9, 8192);
    let w = h.qs[0]
        .drv
        .request(VIRTIO_BLK_T_OUT, 16, Some(&data), 8192, false);
    assert_eq!(h.run_one(0, &w).0, VIRTIO_BLK_S_OK);
    let r = h.qs[0].drv.request(VIRTIO_BLK_T_IN, 16, None, 8192, false);
    assert_eq!(h.run_one(0, &r).0, VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 8192];
    h.mem.read_slice(&mut back, r.data).unwrap();
    assert_eq!(back, data);
    match &*h.dev.backend {
        backend::Backend::Uring(u) => eprintln!("direct I/O in effect: {}", u.direct),
        backend::Backend::Null(_) => unreachable!(),
    }
}

#[test]
fn test_multi_segment_and_indirect_chains_complete() {
    let f = image(None, 64);
    let mut h = harness(Opts {
        file: Some(f),
        cfg: "direct=off",
        ..Default::default()
    });
    let d = &mut h.qs[0].drv;
    let hdr = d.alloc(16);
    let mut hb = [0u8; 16];
    hb[8..16].copy_from_slice(&4u64.to_le_bytes()); // IN, sector 4
    h.mem.write_slice(&hb, hdr).unwrap();
    let (a, b) = (d.alloc(512), d.alloc(1024));
    let s = d.alloc(1);
    let head = d.write_chain(&[
        Buf::r(hdr, 16),
        Buf::w(a, 512),
        Buf::w(b, 1024),
        Buf::w(s, 1),
    ]);
    let built = Built {
        head,
        status: s,
        data: a,
    };
    assert_eq!(h.run_one(0, &built), (VIRTIO_BLK_S_OK, 1537));
    let expect = read_file(h._file.as_ref().unwrap(), 4 * 512, 1536);
    let mut got = vec![0u8; 1536];
    h.mem.read_slice(&mut got[..512], a).unwrap();
    h.mem.read_slice(&mut got[512..], b).unwrap();
    assert_eq!(got, expect);
    let data = pattern(1, 512);
    let ind = h.qs[0]
        .drv
        .request(VIRTIO_BLK_T_OUT, 0, Some(&data), 512, true);
    assert_eq!(h.run_one(0, &ind).0, VIRTIO_BLK_S_OK);
    assert_eq!(read_file(h._file.as_ref().unwrap(), 0, 512), data);
}

#[test]
fn test_flush_get_id_discard_write_zeroes_complete_ok() {
    let f = image(None, 64);
    let mut h = harness(Opts {
        file: Some(f),
        cfg: "direct=off,id=disk-serial-7",
        ..Default::default()
    });
    let fl = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
    assert_eq!(h.run_one(0, &fl), (VIRTIO_BLK_S_OK, 1));
    let id = h.qs[0].drv.request(VIRTIO_BLK_T_GET_ID, 0, None, 20, false);
    assert_eq!(h.run_one(0, &id), (VIRTIO_BLK_S_OK, 21));
    let mut idb = [0u8; 20];
    h.mem.read_slice(&mut idb, id.data).unwrap();
    assert_eq!(&idb[..13], b"disk-serial-7");
    assert_eq!(idb[13], 0);

    let seg = |sector: u64, n: u32, flags: u32| {
        let mut p = [0u8; 16];
        p[0..8].copy_from_slice(&sector.to_le_bytes());
        p[8..12].copy_from_slice(&n.to_le_bytes());
        p[12..16].copy_from_slice(&flags.to_le_bytes());
        p
    };
    let dc = h.qs[0]
        .drv
        .request(VIRTIO_BLK_T_DISCARD, 0, Some(&seg(8, 8, 0)), 16, false);
    assert_eq!(h.run_one(0, &dc).0, VIRTIO_BLK_S_OK);
    assert!(read_file(h._file.as_ref().unwrap(), 8 * 512, 4096)
        .iter()
        .all(|&b| b == 0));
    let wz = h.qs[0].drv.request(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        Some(&seg(33, 3, 0)),
        16,
        false,
    );
    assert_eq!(h.run_one(0, &wz).0, VIRTIO_BLK_S_OK);
    let f = &h._file.as_ref().unwrap().path().to_path_buf();
    assert!(read_file(f, 33 * 512, 1536).iter().all(|&b| b == 0));
    assert_ne!(
        read_file(f, 32 * 512, 512),
        vec![0u8; 512],
        "sector before the range is untouched"
    );
    assert_ne!(
        read_file(f, 36 * 512, 512),
        vec![0u8; 512],
        "sector after the range is untouched"
    );
    let wzu = h.qs[0].drv.request(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        Some(&seg(40, 2, DWZ_FLAG_UNMAP)),
        16,
        false,
    );
    assert_eq!(h.run_one(0, &wzu).0, VIRTIO_BLK_S_OK);
    assert!(read_file(f, 40 * 512, 1024).iter().all(|&b| b == 0));
    assert_eq!(std::fs::metadata(f).unwrap().len(), 64 * 512, "KEEP_SIZE");
    let c = h.stop().queues[0].counters.clone();
    assert_eq!(
        (c.flushes, c.get_ids, c.discards, c.write_zeroes, c.errors),
        (1, 1, 1, 2, 0)
    );
}

#[test]
fn test_unknown_type_and_bad_input_get_status_and_device_keeps_serving() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M",
        ..Default::default()
    });
    let u = h.qs[0].drv.request(42, 0, None, 0, false);
    assert_eq!(h.run_one(0, &u), (VIRTIO_BLK_S_UNSUPP, 1));
    let oob = h.qs[0].drv.request(VIRTIO_BLK_T_IN, 2048, None, 512, false);
    assert_eq!(h.run_one(0, &oob), (VIRTIO_BLK_S_IOERR, 1));
    let ok = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
    assert_eq!(h.run_one(0, &ok).0, VIRTIO_BLK_S_OK);
    assert!(!h.dev.needs_reset());
    let c = h.stop().queues[0].counters.clone();
    assert_eq!((c.unsupported, c.errors, c.flushes), (1, 1, 1));
}

#[test]
fn test_chain_without_status_byte_sets_needs_reset_without_used_entry() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M",
        ..Default::default()
    });
    // A descriptor loop: the device finds no status byte to answer with.
    let d = &mut h.qs[0].drv;
    let hdr = d.alloc(16);
    let head = d.write_chain(&[Buf::r(hdr, 16), Buf::r(hdr, 16)]);
    d.write_desc(head + 1, hdr.0, 16, super::driver::F_NEXT, head);
    let before = h.qs[0].drv.used_idx();
    h.submit(0, &[head]);
    let t = Instant::now();
    while !h.dev.needs_reset() {
        assert!(t.elapsed() < WAIT, "the device never asked for a reset");
        std::thread::sleep(Duration::from_micros(200));
    }
    // No used entry: a driver would read its stale status byte as the answer.
    assert_eq!(h.qs[0].drv.used_idx(), before);
    // A broken queue takes nothing more until the reset.
    let r = h.qs[0].drv.request(VIRTIO_BLK_T_IN, 0, None, 512, false);
    h.submit(0, &[r.head]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.qs[0].drv.used_idx(), before);
}

#[test]
fn test_readonly_disk_offers_ro_and_rejects_writes() {
    let f = image(None, 16);
    let mut h = harness(Opts {
        file: Some(f),
        cfg: "readonly,direct=off",
        ..Default::default()
    });
    assert_ne!(h.dev.features() & config::features::RO, 0);
    assert_eq!(h.dev.features() & config::features::DISCARD, 0);
    let w = h.qs[0]
        .drv
        .request(VIRTIO_BLK_T_OUT, 0, Some(&[0u8; 512]), 512, false);
    assert_eq!(h.run_one(0, &w), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(
        read_file(h._file.as_ref().unwrap(), 0, 512),
        pattern_of_image(0, 512)
    );
    let r = h.qs[0].drv.request(VIRTIO_BLK_T_IN, 0, None, 512, false);
    assert_eq!(h.run_one(0, &r).0, VIRTIO_BLK_S_OK);
}

fn pattern_of_image(off: u64, len: usize) -> Vec<u8> {
    (off..off + len as u64).map(|i| (i % 251) as u8).collect()
}

#[test]
fn test_null_backend_completes_without_touching_data() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=64M,queue-size=128",
        ..Default::default()
    });
    assert_eq!(h.dev.capacity_sectors(), 128 * 1024);
    let mut heads = Vec::new();
    let mut built = Vec::new();
    for i in 0..100u64 {
        // Indirect: 100 chains of 3 descriptors would not fit the 128-entry table.
        let b = h.qs[0]
            .drv
            .request(VIRTIO_BLK_T_IN, i * 8, None, 4096, true);
        h.mem.write_slice(&[0xaa; 4096], b.data).unwrap();
        heads.push(b.head);
        built.push(b);
    }
    h.submit(0, &heads);
    h.wait_used(0, 100);
    for b in &built {
        assert_eq!(h.qs[0].drv.status(b), VIRTIO_BLK_S_OK);
        assert_eq!(h.mem.read_obj::<u8>(b.data).unwrap(), 0xaa);
    }
    let rep = h.stop();
    assert_eq!(rep.queues[0].counters.reads, 100);
    assert!(rep.queues[0].batch.max() <= crate::reactor::BATCH_MAX as u64);
}

#[test]
fn test_event_idx_suppresses_irq_until_used_event_reached() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M",
        event_idx: true,
        ..Default::default()
    });
    // used_event = 5: no interrupt for the first completions.
    h.qs[0].drv.set_used_event(5);
    for i in 0..3u16 {
        let b = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
        h.run_one(0, &b);
        assert_eq!(h.irq_count(0), 0, "completion {i} must not interrupt");
    }
    h.qs[0].drv.set_used_event(3);
    let b = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
    h.run_one(0, &b);
    assert_eq!(h.irq_count(0), 1);
    let c = h.stop().queues[0].counters.clone();
    assert_eq!((c.irqs_sent, c.irqs_suppressed), (1, 3));
}

#[test]
fn test_without_event_idx_every_batch_interrupts() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M",
        ..Default::default()
    });
    for _ in 0..3 {
        let b = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
        h.run_one(0, &b);
    }
    assert_eq!(h.irq_count(0), 3);
}

#[test]
fn test_no_vector_queue_never_signals() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M",
        irq: false,
        ..Default::default()
    });
    for _ in 0..5 {
        let b = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
        assert_eq!(h.run_one(0, &b).0, VIRTIO_BLK_S_OK);
    }
    let c = h.stop().queues[0].counters.clone();
    assert_eq!((c.irqs_sent, c.irqs_suppressed), (0, 5));
}

#[test]
fn test_two_queues_on_two_reactors_both_serve() {
    let f = image(None, 256);
    let mut h = harness(Opts {
        file: Some(f),
        cfg: "direct=off,queues=2,reactors=0,1",
        reactors: 2,
        ..Default::default()
    });
    assert_eq!(h.dev.placement(), &[0, 1]);
    let mut built = Vec::new();
    for q in 0..2 {
        let data = pattern(q as u8, 512);
        let b = h.qs[q]
            .drv
            .request(VIRTIO_BLK_T_OUT, 100 + q as u64, Some(&data), 512, false);
        h.submit(q, &[b.head]);
        built.push(b);
    }
    for (q, b) in built.iter().enumerate() {
        h.wait_used(q, 1);
        assert_eq!(h.qs[q].drv.status(b), VIRTIO_BLK_S_OK);
        assert_eq!(
            read_file(h._file.as_ref().unwrap(), (100 + q as u64) * 512, 512),
            pattern(q as u8, 512)
        );
    }
    let snap = h.pool.as_ref().unwrap().snapshot().unwrap();
    assert_eq!(snap.reactors.len(), 2);
    assert_eq!(
        snap.queues
            .iter()
            .map(|q| (q.queue, q.reactor))
            .collect::<Vec<_>>(),
        vec![(0, 0), (1, 1)]
    );
    let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    assert!(threads.iter().any(|t| t == "reactor1"), "{threads:?}");
}
