//! The pool of reactor threads and the handle devices use to reach them.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::{Command, Reactor};
use super::snapshot::Collector;
use super::{HandlerFactory, ReactorError, ReactorOptions, CONTROL_TIMEOUT};
use crate::metrics::Report;
use crate::seccomp::{ThreadFilter, ThreadKind};
use crate::vmm::exit::{ExitHandle, ExitReason};
use crate::vmm::thread;

struct Link {
    tx: Sender<Command>,
    wake: EventFd,
    /// The core the reactor is pinned to.
    core: usize,
}

struct Inner {
    links: Vec<Link>,
    started: Instant,
    /// The cumulative report and the snapshot buffers lent to the reactors; held across a
    /// snapshot, so concurrent callers take turns (the later one usually reuses the
    /// earlier one's result, see [`PoolHandle::snapshot_with`]).
    collector: Mutex<Collector>,
    /// The next key [`PoolHandle::device_keys`] hands out.
    next_key: AtomicU64,
    /// The next ordinal per device kind ([`PoolHandle::ordinal`]).
    next_ordinal: [AtomicU64; DeviceKindOrdinal::COUNT],
}

/// The device kinds numbered separately for their names (`blk0`, `net0`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKindOrdinal {
    Block = 0,
    Net = 1,
}

impl DeviceKindOrdinal {
    const COUNT: usize = 2;
}

/// A cheap, cloneable way for devices to send messages to the reactors. Holds no thread.
#[derive(Clone)]
pub struct PoolHandle(Arc<Inner>);

impl PoolHandle {
    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.0.links.len()
    }

    /// True when the pool has no reactor (never, for a started pool).
    pub fn is_empty(&self) -> bool {
        self.0.links.is_empty()
    }

    /// Reserves `count` keys that no other device on this pool uses: a device attaches,
    /// detaches and tunes its queues by these keys (`device` in [`attach`](Self::attach)).
    /// The one source of device keys, for block and net alike.
    pub fn device_keys(&self, count: u64) -> Range<u64> {
        let start = self.0.next_key.fetch_add(count, Ordering::Relaxed);
        start..start + count
    }

    /// The next ordinal of a device of `kind` on this pool (0, 1, … per kind): names a
    /// device without an `id=` (`blk0`, `net1`) and spreads its first queue over the
    /// reactors. Per pool, so per VM: every `ringvm bench` job's first disk is `blk0`.
    pub fn ordinal(&self, kind: DeviceKindOrdinal) -> u64 {
        self.0.next_ordinal[kind as usize].fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, index: usize, cmd: Command) -> Result<(), ReactorError> {
        let link = self.0.links.get(index).ok_or(ReactorError::NoSuchReactor {
            index,
            len: self.len(),
        })?;
        link.tx
            .send(cmd)
            .map_err(|_| ReactorError::Gone { index })?;
        link.wake.write(1).map_err(|_| ReactorError::Gone { index })
    }

    fn collector(&self) -> MutexGuard<'_, Collector> {
        self.0.collector.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Like [`wait`](Self::wait), polling the channel for up to `spin` first: a reactor
    /// answers a snapshot within one pass, and parking for it would cost the caller two
    /// context switches and the reactor a cross-core wake-up per snapshot.
    fn wait_spinning<T>(index: usize, rx: &Receiver<T>, spin: Duration) -> Result<T, ReactorError> {
        let start = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(v) => return Ok(v),
                Err(mpsc::TryRecvError::Disconnected) => return Err(ReactorError::Gone { index }),
                Err(mpsc::TryRecvError::Empty) if start.elapsed() < spin => {
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return Self::wait(index, rx),
            }
        }
    }

    fn wait<T>(index: usize, rx: &Receiver<T>) -> Result<T, ReactorError> {
        rx.recv_timeout(CONTROL_TIMEOUT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => ReactorError::Timeout {
                index,
                timeout_ms: CONTROL_TIMEOUT.as_millis(),
            },
            mpsc::RecvTimeoutError::Disconnected => ReactorError::Gone { index },
        })
    }

    /// Hands a queue to reactor `index`: `factory` runs on the reactor thread. `device` groups
    /// the queues that [`detach`](Self::detach) later removes together.
    pub fn attach(
        &self,
        index: usize,
        device: u64,
        factory: HandlerFactory,
    ) -> Result<(), ReactorError> {
        let (ack, rx) = mpsc::sync_channel(1);
        self.send(
            index,
            Command::Attach {
                device,
                factory,
                ack,
            },
        )?;
        Self::wait(index, &rx)?.map_err(|message| ReactorError::Attach { index, message })?;
        self.collector().attached(index, device);
        Ok(())
    }

    /// Removes every queue of `device` from reactor `index`: the reactor stops popping, waits
    /// for the requests in flight, publishes them and drops the queues. Returns once the
    /// reactor no longer touches the device's guest memory (or after [`CONTROL_TIMEOUT`]).
    pub fn detach(&self, index: usize, device: u64) -> Result<(), ReactorError> {
        let (ack, rx) = mpsc::sync_channel(1);
        self.send(index, Command::Detach { device, ack })?;
        Self::wait(index, &rx)?;
        self.collector().detached(index, device);
        Ok(())
    }

    /// Detaches several queues at once: every detach is sent before any is waited for, so the
    /// drains overlap. Returns the result of each, in order.
    pub fn detach_many(&self, queues: &[(usize, u64)]) -> Vec<Result<(), ReactorError>> {
        let sent: Vec<_> = queues
            .iter()
            .map(|&(index, device)| {
                let (ack, rx) = mpsc::sync_channel(1);
                self.send(index, Command::Detach { device, ack })
                    .map(|()| rx)
            })
            .collect();
        let done: Vec<_> = sent
            .into_iter()
            .zip(queues)
            .map(|(r, &(index, _))| r.and_then(|rx| Self::wait(index, &rx)))
            .collect();
        let mut c = self.collector();
        for (r, &(index, device)) in done.iter().zip(queues) {
            if r.is_ok() {
                c.detached(index, device);
            }
        }
        done
    }

    /// Sets the busy-poll window maximum (`poll-us`) of every queue whose pool key is in
    /// `keys` (one device's queues: `BlockDevice::pool_keys`, `NetDevice::pool_keys`) on every
    /// reactor, now and for queues the device attaches later (zero: no polling). With
    /// adaptive polling this is the most the per-queue window grows to; with fixed polling
    /// it is the window. Returns how many queues it changed. The reactors apply it at their
    /// next pass boundary, as they answer snapshots.
    pub fn set_poll_max(&self, keys: Range<u64>, max: Duration) -> Result<usize, ReactorError> {
        let mut rxs = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            let (ack, rx) = mpsc::sync_channel(1);
            self.send(
                i,
                Command::SetPollMax {
                    keys: keys.clone(),
                    max,
                    ack,
                },
            )?;
            rxs.push(rx);
        }
        let mut n = 0;
        for (i, rx) in rxs.into_iter().enumerate() {
            n += Self::wait(i, &rx)?;
        }
        Ok(n)
    }

    /// Metrics of all reactors, merged (a copy of the cumulative report: for callers that
    /// keep it; periodic readers use [`snapshot_with`](Self::snapshot_with)).
    pub fn snapshot(&self) -> Result<Report, ReactorError> {
        self.snapshot_with(Duration::ZERO, Report::clone)
    }

    /// Brings the pool's cumulative report up to date, unless that was done less than
    /// `reuse` ago, and calls `f` on it. In steady state nothing is allocated or copied:
    /// each reactor swaps the empty recorders of its lent buffer with its queues' and
    /// sends them back; they are drained into the report here (emptied) and kept.
    pub fn snapshot_with<R>(
        &self,
        reuse: Duration,
        f: impl FnOnce(&Report) -> R,
    ) -> Result<R, ReactorError> {
        let mut c = self.collector();
        if c.taken.is_some_and(|t| t.elapsed() < reuse) {
            return Ok(f(&c.merged));
        }
        let mut failed = None;
        let on_core = current_core();
        for i in 0..self.len() {
            if c.pending[i].is_some() {
                continue;
            }
            let buf = c.bufs[i].take().unwrap_or_default();
            let (ack, rx) = mpsc::sync_channel(1);
            match self.send(i, Command::Snapshot { buf, ack }) {
                Ok(()) => c.pending[i] = Some(rx),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        for i in 0..self.len() {
            let Some(rx) = c.pending[i].take() else {
                continue;
            };
            // Spinning on the reactor's own core would only keep it from answering.
            let spin = if on_core == Some(self.0.links[i].core) {
                Duration::ZERO
            } else {
                SNAPSHOT_SPIN
            };
            match Self::wait_spinning(i, &rx, spin) {
                Ok(mut buf) => {
                    c.absorb(i, &mut buf);
                    c.bufs[i] = Some(buf);
                }
                Err(e) => {
                    if matches!(e, ReactorError::Timeout { .. }) {
                        // Its answer, when it comes, still carries an interval.
                        c.pending[i] = Some(rx);
                    }
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        c.merged.elapsed = self.0.started.elapsed();
        c.taken = Some(Instant::now());
        Ok(f(&c.merged))
    }
}

/// How long a snapshot polls for each reactor's answer before it parks, when the caller
/// runs on another core than the reactor.
const SNAPSHOT_SPIN: Duration = Duration::from_micros(50);

/// The core the calling thread runs on now (None if the kernel cannot say).
fn current_core() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and only reads the calling thread's state.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// The reactor threads. Dropping the pool without [`stop`](Self::stop) lets the threads drain
/// and exit on their own.
pub struct ReactorPool {
    handle: PoolHandle,
    threads: Vec<JoinHandle<Option<()>>>,
}

impl ReactorPool {
    /// Starts one pinned reactor thread per core in `opts.cores`, named `reactor0`, `reactor1`, …
    /// Fails if any ring cannot be set up (the error says which and why).
    pub fn start(opts: ReactorOptions, exit: ExitHandle) -> Result<ReactorPool, ReactorError> {
        if opts.cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        let mut links = Vec::with_capacity(opts.cores.len());
        let mut threads = Vec::with_capacity(opts.cores.len());
        let mut ready = Vec::with_capacity(opts.cores.len());
        let filter = ThreadFilter::new(ThreadKind::Reactor, opts.seccomp)?;
        for (index, &core) in opts.cores.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let wake = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| ReactorError::EventFd { index, source })?;
            let wake_reactor = wake
                .try_clone()
                .map_err(|source| ReactorError::EventFd { index, source })?;
            let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
            let o = opts.clone();
            let ex = exit.clone();
            let t = thread::spawn(
                &format!("reactor{index}"),
                Some(core),
                filter.clone(),
                exit.clone(),
                move || reactor_main(index, core, &o, rx, wake_reactor, ready_tx, ex),
            )
            .map_err(|source| ReactorError::Spawn { index, source })?;
            links.push(Link { tx, wake, core });
            threads.push(t);
            ready.push(ready_rx);
        }
        let pool = ReactorPool {
            handle: PoolHandle(Arc::new(Inner {
                links,
                started: Instant::now(),
                collector: Mutex::new(Collector::new(&opts.cores)),
                next_key: AtomicU64::new(0),
                next_ordinal: Default::default(),
            })),
            threads,
        };
        for (index, rx) in ready.into_iter().enumerate() {
            match PoolHandle::wait(index, &rx) {
                Ok(Ok(())) => {}
                Ok(Err(source)) => return Err(ReactorError::Ring { index, source }),
                Err(e) => return Err(e),
            }
        }
        Ok(pool)
    }

    /// A handle for devices.
    pub fn handle(&self) -> PoolHandle {
        self.handle.clone()
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handle.len()
    }

    /// True when the pool has no reactor.
    pub fn is_empty(&self) -> bool {
        self.handle.is_empty()
    }

    /// Metrics of all reactors, merged (e.g. on SIGUSR1).
    pub fn snapshot(&self) -> Result<Report, ReactorError> {
        self.handle.snapshot()
    }

    /// See [`PoolHandle::snapshot_with`].
    pub fn snapshot_with<R>(
        &self,
        reuse: Duration,
        f: impl FnOnce(&Report) -> R,
    ) -> Result<R, ReactorError> {
        self.handle.snapshot_with(reuse, f)
    }

    /// Stops every reactor after its queues drained, joins the threads and returns the final
    /// metrics. A reactor that does not answer within [`CONTROL_TIMEOUT`] is left behind with
    /// a logged error and its metrics are missing from the report.
    pub fn stop(mut self) -> Result<Report, ReactorError> {
        let threads = std::mem::take(&mut self.threads);
        let mut rxs = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            let (ack, rx): (SyncSender<Report>, _) = mpsc::sync_channel(1);
            match self.handle.send(i, Command::Stop { ack }) {
                Ok(()) => rxs.push(Some(rx)),
                Err(e) => {
                    log::error!("{e}");
                    rxs.push(None);
                }
            }
        }
        let mut c = self.handle.collector();
        for ((i, rx), t) in rxs.into_iter().enumerate().zip(threads) {
            let Some(rx) = rx else { continue };
            match PoolHandle::wait(i, &rx) {
                Ok(r) => {
                    // A snapshot that timed out was answered before the stop.
                    if let Some(Ok(mut buf)) = c.pending[i].take().map(|p| p.try_recv()) {
                        c.absorb(i, &mut buf);
                    }
                    c.absorb_report(i, &r);
                    let _ = t.join();
                }
                Err(e) => log::error!("Stopping the reactors: {e}"),
            }
        }
        c.merged.elapsed = self.handle.0.started.elapsed();
        Ok(c.merged.clone())
    }
}

impl Drop for ReactorPool {
    /// Without [`stop`](Self::stop): asks every reactor to drain and exit, without waiting.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        for i in 0..self.len() {
            let (ack, _rx) = mpsc::sync_channel(1);
            let _ = self.handle.send(i, Command::Stop { ack });
        }
    }
}

fn reactor_main(
    index: usize,
    core: usize,
    opts: &ReactorOptions,
    rx: Receiver<Command>,
    wake: EventFd,
    ready: SyncSender<std::io::Result<()>>,
    exit: ExitHandle,
) {
    let reactor = match Reactor::new(index, core, opts, rx, wake) {
        Ok(r) => {
            let _ = ready.send(Ok(()));
            r
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Err(e) = reactor.run() {
        log::error!("reactor{index}: io_uring failed: {e}");
        exit.request(ExitReason::DeviceError {
            message: format!("reactor{index}: io_uring failed: {e}"),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::metrics::QueueRecorder;
    use crate::reactor::{QueueHandler, RingCtx};

    fn start(n: usize) -> ReactorPool {
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

    /// Counts kicks (and records a latency of as many µs as kicks so far) and pops nothing.
    struct Counter {
        kick: EventFd,
        kicks: Arc<AtomicUsize>,
        metrics: QueueRecorder,
    }

    impl Counter {
        fn boxed(kick: EventFd, kicks: Arc<AtomicUsize>, device: &str) -> Box<dyn QueueHandler> {
            Box::new(Counter {
                kick,
                kicks,
                metrics: QueueRecorder::new(device, 0, 0),
            })
        }
    }

    impl QueueHandler for Counter {
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
            let n = self.kicks.fetch_add(1, Ordering::SeqCst) as u64 + 1;
            self.metrics.counters.kicks += 1;
            self.metrics.record_k2c(Duration::from_micros(n));
            self.metrics.record_service(Duration::from_micros(n * 3));
            self.metrics.record_batch(1);
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

    #[test]
    fn test_start_without_cores_fails() {
        let r = ReactorPool::start(
            ReactorOptions {
                cores: vec![],
                ..Default::default()
            },
            ExitHandle::new().unwrap(),
        );
        assert!(matches!(r, Err(ReactorError::NoCores)));
    }

    #[test]
    fn test_ordinals_count_per_kind_and_per_pool() {
        let (a, b) = (start(1), start(1));
        let (ha, hb) = (a.handle(), b.handle());
        assert_eq!(ha.ordinal(DeviceKindOrdinal::Block), 0);
        assert_eq!(ha.ordinal(DeviceKindOrdinal::Block), 1);
        assert_eq!(ha.ordinal(DeviceKindOrdinal::Net), 0);
        assert_eq!(
            hb.ordinal(DeviceKindOrdinal::Block),
            0,
            "a new VM starts again at 0"
        );
        assert_eq!(ha.device_keys(2), 0..2);
        assert_eq!(
            ha.device_keys(1),
            2..3,
            "keys stay one sequence for every kind"
        );
    }

    #[test]
    fn test_attach_to_missing_reactor_fails() {
        let p = start(1);
        let r = p.handle().attach(3, 0, Box::new(|_| Err("unused".into())));
        assert!(matches!(
            r,
            Err(ReactorError::NoSuchReactor { index: 3, len: 1 })
        ));
    }

    #[test]
    fn test_factory_error_reaches_caller() {
        let p = start(1);
        let r = p
            .handle()
            .attach(0, 0, Box::new(|_| Err("no thanks".into())));
        match r {
            Err(ReactorError::Attach { index: 0, message }) => assert_eq!(message, "no thanks"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_each_kick_write_is_seen_once_or_coalesced_never_lost() {
        let p = start(2);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kicks = Arc::new(AtomicUsize::new(0));
        let (k, c) = (kick.try_clone().unwrap(), kicks.clone());
        p.handle()
            .attach(1, 7, Box::new(move |_| Ok(Counter::boxed(k, c, "mock"))))
            .unwrap();
        for i in 1..=20 {
            kick.write(1).unwrap();
            let t = Instant::now();
            while kicks.load(Ordering::SeqCst) < i {
                assert!(t.elapsed() < CONTROL_TIMEOUT, "kick {i} never seen");
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        p.handle().detach(1, 7).unwrap();
        let rep = p.stop().unwrap();
        assert_eq!(rep.reactors.len(), 2);
        assert_eq!(rep.queues.len(), 1, "detached queue metrics are kept");
    }

    #[test]
    fn test_snapshot_lists_every_reactor_and_threads_are_named() {
        let p = start(2);
        let snap = p.snapshot().unwrap();
        assert_eq!(
            snap.reactors.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|s| s.trim().to_string())
            .collect();
        assert!(
            names.iter().any(|n| n == "reactor0") && names.iter().any(|n| n == "reactor1"),
            "{names:?}"
        );
        p.stop().unwrap();
    }

    #[test]
    fn test_detach_many_drops_each_queue_and_reports_each_result() {
        let p = start(2);
        let kicks = Arc::new(AtomicUsize::new(0));
        let mut fds = Vec::new();
        for (reactor, key) in [(0, 1), (1, 2)] {
            let k = EventFd::new(EFD_NONBLOCK).unwrap();
            fds.push(k.try_clone().unwrap());
            let c = kicks.clone();
            p.handle()
                .attach(
                    reactor,
                    key,
                    Box::new(move |_| Ok(Counter::boxed(k, c, "mock"))),
                )
                .unwrap();
        }
        let r = p.handle().detach_many(&[(0, 1), (1, 2), (5, 3)]);
        assert!(r[0].is_ok() && r[1].is_ok(), "{r:?}");
        assert!(matches!(
            r[2],
            Err(ReactorError::NoSuchReactor { index: 5, .. })
        ));
        // Neither reactor watches its queue's kick any more.
        for k in &fds {
            k.write(1).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(kicks.load(Ordering::SeqCst), 0);
        p.stop().unwrap();
    }

    #[test]
    fn test_set_poll_max_reaches_attached_queues_and_later_ones() {
        let p = start(2);
        let attach = |reactor: usize| {
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let kicks = Arc::new(AtomicUsize::new(0));
            p.handle()
                .attach(
                    reactor,
                    9,
                    Box::new(move |_| Ok(Counter::boxed(kick, kicks, "mock"))),
                )
                .unwrap();
        };
        attach(0);
        let h = p.handle();
        assert_eq!(h.set_poll_max(9..10, Duration::from_micros(50)).unwrap(), 1);
        assert_eq!(
            h.set_poll_max(10..11, Duration::ZERO).unwrap(),
            0,
            "unknown device"
        );
        attach(1);
        assert_eq!(h.set_poll_max(8..10, Duration::ZERO).unwrap(), 2);
        p.stop().unwrap();
    }

    #[test]
    fn test_detach_of_unknown_device_acks_at_once() {
        let p = start(1);
        let t = Instant::now();
        p.handle().detach(0, 12345).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
