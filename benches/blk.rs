//! virtio-blk data-path costs without KVM:
//! - `parse/*`: walk one chain (header, 4 KiB data, status) and parse it;
//! - `reactor_pass/null_64`: one reactor pass over 64 requests on the null back end through
//!   the synthetic driver (publish 64 avail entries, kick, pop+parse+complete+used ring+irq
//!   decision, one io_uring_enter); criterion's throughput line gives requests/s;
//! - `reactor_pass/file_cached_64`: the same with 4 KiB readv from a page-cached file;
//! - `histogram/record`: one latency sample into a preallocated HdrHistogram.
//!
//! Run: `cargo bench --bench blk`. Results go in perf/ as ratios, not absolutes.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringvm::devices::virtio::block::backend::{Backend, OpenOptions, UringBackend};
use ringvm::devices::virtio::block::config::DiskInfo;
use ringvm::devices::virtio::block::driver::TestDriver;
use ringvm::devices::virtio::block::handler::BlockQueue;
use ringvm::devices::virtio::block::request::{
    parse, Chain, Segment, IOVEC_EMPTY, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use ringvm::devices::virtio::queue::QueueParts;
use ringvm::metrics::QueueRecorder;
use ringvm::reactor::{QueueHandler, Reactor, ReactorOptions};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 16 << 20;

fn bench_parse(c: &mut Criterion) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let disk = DiskInfo::new(1 << 30, false, 256, "bench");
    let mut scratch = vec![Segment::default(); disk.seg_max as usize + 2];
    let mut iov = vec![IOVEC_EMPTY; disk.seg_max as usize + 8];
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    for (name, indirect) in [("read_4k", false), ("write_4k_indirect", true)] {
        let mut d = TestDriver::new(&mem, GuestAddress(0x1000), 256, MEM as u64);
        let q = d.queue(true);
        let ty = if indirect {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let b = d.request(ty, 8, None, 4096, indirect);
        g.bench_function(name, |bch| {
            bch.iter(|| {
                let chain = Chain::new(&mem, GuestAddress(q.desc_table()), q.size(), b.head);
                black_box(parse(chain, &mem, &disk, &mut scratch, &mut iov).unwrap());
            })
        });
    }
    g.finish();
}

/// One reactor pass (or as many as the completions need) over 64 4 KiB reads, on the null
/// back end or on a page-cached file through io_uring.
fn reactor_pass(c: &mut Criterion, name: &str, file: Option<&std::path::Path>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let (mut reactor, _ctl) = Reactor::new_local(&ReactorOptions::default()).unwrap();
    let mut d = TestDriver::new(&mem, GuestAddress(0x1000), 256, MEM as u64);
    let heads: Vec<u16> = (0..64)
        .map(|i| d.request(VIRTIO_BLK_T_IN, i * 8, None, 4096, false).head)
        .collect();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq_reader = irq.try_clone().unwrap();
    let disk = Arc::new(DiskInfo::new(1 << 30, false, 256, "bench"));
    let parts = QueueParts {
        name: "bench-q0".into(),
        mem: mem.clone(),
        queue: d.queue(true),
        kick: kick.try_clone().unwrap(),
        irq: Some(irq),
        needs_reset: Arc::new(AtomicBool::new(false)),
        poll: None,
        metrics: QueueRecorder::new("bench", 0, 0),
        final_avail: None,
    };
    let opts = OpenOptions {
        readonly: false,
        direct: false,
        lock: true,
    };
    let backend = file.map(|p| Arc::new(Backend::Uring(UringBackend::open(p, opts).unwrap())));
    reactor
        .attach_local(
            0,
            Box::new(move |ctx| {
                let (io, files) = match &backend {
                    Some(b) => (
                        b.queue_io(ctx.fixed_file, ctx.alt_fixed_file),
                        [b.fd(), b.alt_fd()],
                    ),
                    None => (None, [None, None]),
                };
                Ok(Box::new(BlockQueue::new(parts, disk, io, files)) as Box<dyn QueueHandler>)
            }),
        )
        .unwrap();
    reactor.turn_nowait().unwrap();
    let mut g = c.benchmark_group("reactor_pass");
    g.throughput(Throughput::Elements(64));
    g.bench_function(name, |bch| {
        bch.iter(|| {
            let target = d.used_idx().wrapping_add(64);
            d.publish_many(&heads);
            // Keep EVENT_IDX asking for an interrupt on every batch (worst case).
            d.set_used_event(target.wrapping_sub(1));
            kick.write(1).unwrap();
            while d.used_idx() != target {
                reactor.turn_nowait().unwrap();
            }
            reactor.turn_nowait().unwrap();
        })
    });
    g.finish();
    let _ = irq_reader.read();
    let rep = reactor.report();
    let q = &rep.queues[0];
    eprintln!(
        "reactor_pass/{name}: {} requests, {} errors, {} irqs, batch mean {:.1}, reactor busy ns/request {}",
        q.counters.requests(),
        q.counters.errors,
        q.counters.irqs_sent,
        q.batch.mean(),
        rep.busy_ns_per_request()
    );
}

fn bench_reactor_pass(c: &mut Criterion) {
    reactor_pass(c, "null_64", None);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.img");
    std::fs::write(&path, vec![7u8; 64 * 4096]).unwrap();
    reactor_pass(c, "file_cached_64", Some(&path));
}

fn bench_histogram(c: &mut Criterion) {
    let mut m = QueueRecorder::new("bench", 0, 0);
    let mut x = 1u64;
    c.bench_function("histogram/record", |b| {
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            m.record_k2c(Duration::from_nanos(black_box(x >> 40)));
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_parse, bench_reactor_pass, bench_histogram
}
criterion_main!(benches);
