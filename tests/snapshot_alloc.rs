//! Statistics snapshots in steady state allocate nothing on the reactor thread and nothing
//! large anywhere (no mmap/munmap per scrape), and still give the numbers a copy would.
//!
//! A test binary of its own: its global allocator counts allocations per thread (read on
//! the reactor thread by the queue handler itself) and large ones process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringvm::metrics::{QueueRecorder, LATENCY_MAX_NS, SIGFIGS};
use ringvm::reactor::{QueueHandler, ReactorOptions, ReactorPool, RingCtx};
use ringvm::vmm::exit::ExitHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Allocations of at least this size are served by mmap (glibc's threshold starts at 128 KiB).
const LARGE: usize = 64 * 1024;

struct Counting;

thread_local! {
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
}
static LARGE_ALLOCS: AtomicU64 = AtomicU64::new(0);
/// The tests of this binary run one at a time: the large-allocation count is process-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(Layout::from_size_align(new, l.align()).unwrap_or(l));
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}

fn count(l: Layout) {
    // `try_with`: the thread may be tearing down its locals.
    let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
    if l.size() >= LARGE {
        LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// On each kick: records latencies of `kicks` µs and notes how many allocations its (the
/// reactor's) thread made so far.
struct Probe {
    kick: EventFd,
    kicks: Arc<AtomicU64>,
    reactor_allocs: Arc<AtomicU64>,
    metrics: QueueRecorder,
}

impl QueueHandler for Probe {
    fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }
    fn file_fd(&self) -> Option<RawFd> {
        None
    }
    fn poll_window(&self) -> Option<Duration> {
        None
    }
    fn kicked(&mut self, _: Instant) {
        let n = self.kicks.load(Ordering::SeqCst) + 1;
        self.metrics.counters.kicks += 1;
        self.metrics.record_k2c(Duration::from_micros(n));
        self.metrics.record_service(Duration::from_micros(3 * n));
        self.metrics.record_batch(1);
        self.reactor_allocs
            .store(THREAD_ALLOCS.with(Cell::get), Ordering::SeqCst);
        self.kicks.store(n, Ordering::SeqCst);
    }
    fn set_notify(&mut self, _: bool) -> bool {
        false
    }
    fn poll_avail(&mut self, _: &mut RingCtx<'_, '_>, _: usize) -> usize {
        0
    }
    fn poll_hit(&mut self) {}
    fn complete(&mut self, _: &mut RingCtx<'_, '_>, _: u32, _: i32) {}
    fn publish(&mut self) {}
    fn in_flight(&self) -> usize {
        0
    }
    fn metrics(&self) -> &QueueRecorder {
        &self.metrics
    }
    fn metrics_mut(&mut self) -> &mut QueueRecorder {
        &mut self.metrics
    }
}

struct Rig {
    pool: ReactorPool,
    kick: EventFd,
    kicks: Arc<AtomicU64>,
    reactor_allocs: Arc<AtomicU64>,
}

impl Rig {
    fn new() -> Rig {
        let pool = ReactorPool::start(
            ReactorOptions {
                cores: vec![0],
                ..Default::default()
            },
            ExitHandle::new().unwrap(),
        )
        .unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let (kicks, reactor_allocs) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (k, n, a) = (
            kick.try_clone().unwrap(),
            kicks.clone(),
            reactor_allocs.clone(),
        );
        pool.handle()
            .attach(
                0,
                1,
                Box::new(move |_| {
                    Ok(Box::new(Probe {
                        kick: k,
                        kicks: n,
                        reactor_allocs: a,
                        metrics: QueueRecorder::new("blk0", 0, 0),
                    }) as Box<dyn QueueHandler>)
                }),
            )
            .unwrap();
        Rig {
            pool,
            kick,
            kicks,
            reactor_allocs,
        }
    }

    /// Kicks once and waits until the reactor saw it; returns the reactor thread's
    /// allocations so far.
    fn kick(&self) -> u64 {
        let want = self.kicks.load(Ordering::SeqCst) + 1;
        self.kick.write(1).unwrap();
        let t = Instant::now();
        while self.kicks.load(Ordering::SeqCst) < want {
            assert!(t.elapsed() < Duration::from_secs(5), "kick never seen");
            std::thread::sleep(Duration::from_micros(200));
        }
        self.reactor_allocs.load(Ordering::SeqCst)
    }
}

/// What a copy of the handler's metrics would hold after `n` kicks.
fn expected(n: u64) -> (Histogram<u64>, Histogram<u64>) {
    let mut k2c = Histogram::new_with_bounds(1, LATENCY_MAX_NS, SIGFIGS).unwrap();
    let mut svc = k2c.clone();
    for i in 1..=n {
        k2c.record(i * 1000).unwrap();
        svc.record(3 * i * 1000).unwrap();
    }
    (k2c, svc)
}

#[test]
fn test_snapshot_steady_state_allocates_nothing_on_reactor_and_nothing_large() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new();
    let h = rig.pool.handle();
    // Warm-up: the first snapshots give the buffers their shape (names, channel contexts).
    for _ in 0..3 {
        rig.kick();
        h.snapshot_with(Duration::ZERO, |_| ()).unwrap();
    }
    let reactor_before = rig.kick();
    let large_before = LARGE_ALLOCS.load(Ordering::SeqCst);
    for _ in 0..50 {
        rig.kick();
        let (kicks, n) = h
            .snapshot_with(Duration::ZERO, |r| {
                (
                    r.queues[0].counters.kicks,
                    r.queues[0].kick_to_complete.len(),
                )
            })
            .unwrap();
        assert_eq!(kicks, n, "counters and histograms cover the same interval");
    }
    let reactor_after = rig.kick();
    assert_eq!(
        LARGE_ALLOCS.load(Ordering::SeqCst) - large_before,
        0,
        "a snapshot allocated {LARGE} bytes or more"
    );
    assert_eq!(
        reactor_after - reactor_before,
        0,
        "the reactor thread allocated during snapshots"
    );
    rig.pool.stop().unwrap();
}

#[test]
fn test_snapshot_numbers_equal_a_copy_across_snapshots_detach_and_stop() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new();
    let h = rig.pool.handle();
    let check = |n: u64| {
        let (k2c, svc) = expected(n);
        h.snapshot_with(Duration::ZERO, |r| {
            assert_eq!(r.queues.len(), 1);
            let q = &r.queues[0];
            assert_eq!(q.counters.kicks, n);
            assert_eq!(q.kick_to_complete, k2c, "k2c after {n} kicks");
            assert_eq!(q.service, svc);
            assert_eq!(q.batch.len(), n);
            assert_eq!(r.reactors.len(), 1);
            assert!(r.reactors[0].passes > 0);
        })
        .unwrap();
    };
    for n in 1..=5 {
        rig.kick();
        check(n);
    }
    check(5);
    // Between snapshots the queue detaches: what it recorded since the last one is kept.
    rig.kick();
    h.detach(0, 1).unwrap();
    check(6);
    check(6);
    let (k2c, _) = expected(6);
    let last = rig.pool.stop().unwrap();
    assert_eq!(last.queues[0].kick_to_complete, k2c);
    assert_eq!(last.queues[0].counters.kicks, 6);
}
