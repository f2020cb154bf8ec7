//! One reactor: an io_uring, the queues it serves, and the loop that drives them.
//!
//! [`Reactor`] is usable on any thread (the pool runs it on a pinned thread; benches and
//! tests may drive it inline with [`Reactor::turn`]).

use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, SubmissionQueue, Submitter};
use vmm_sys_util::eventfd::EventFd;

use super::buffers::FixedBuffers;
use super::poll::{choose_in_flight, run_queue, set_poll_max, QueueState};
use super::snapshot::{self, Interval};
use super::{
    AttachCtx, HandlerFactory, InFlightPolicy, QueueHandler, ReactorOptions, MAX_QUEUES_PER_REACTOR,
};
use crate::metrics::{QueueCounters, QueueMetrics, ReactorMetrics, Report};

const KIND_SHIFT: u32 = 62;
const KIND_IO: u64 = 0;
const KIND_KICK: u64 = 1;
const KIND_WAKE: u64 = 2;
const KIND_CANCEL: u64 = 3;

fn user_data(kind: u64, slot: usize, tag: u32) -> u64 {
    (kind << KIND_SHIFT) | ((slot as u64 & 0xffff) << 32) | tag as u64
}

fn decode(ud: u64) -> (u64, usize, u32) {
    (ud >> KIND_SHIFT, ((ud >> 32) & 0xffff) as usize, ud as u32)
}

/// Messages to a reactor.
pub(crate) enum Command {
    Attach {
        device: u64,
        factory: HandlerFactory,
        ack: SyncSender<Result<(), String>>,
    },
    Detach {
        device: u64,
        ack: SyncSender<()>,
    },
    /// Fill the buffer (empty histograms to swap in, see `snapshot.rs`) and send it back.
    Snapshot {
        buf: Box<Interval>,
        ack: SyncSender<Box<Interval>>,
    },
    /// Sets the poll-window maximum of every pollable queue whose key is in `keys` (one
    /// device's queues), now and for queues attached later; answers how many it changed.
    SetPollMax {
        keys: Range<u64>,
        max: Duration,
        ack: SyncSender<usize>,
    },
    Stop {
        ack: SyncSender<Report>,
    },
}

/// What a queue handler sees of the ring during a pass.
pub struct RingCtx<'s, 'r> {
    sq: &'s mut SubmissionQueue<'r>,
    submitter: &'s Submitter<'r>,
    bufs: &'s mut FixedBuffers,
    slot: usize,
    /// Time the current phase of the pass started (one clock read per phase, not per request).
    pub now: Instant,
    /// Fuzz harnesses: operations are recorded (by tag) instead of queued on the ring.
    #[cfg(any(test, feature = "fuzz"))]
    pub(super) record: Option<&'s mut Vec<u32>>,
}

impl<'s, 'r> RingCtx<'s, 'r> {
    /// A context over `ring`'s queues, for driving a handler outside a reactor (tests).
    #[cfg(test)]
    pub(super) fn for_test(
        sq: &'s mut SubmissionQueue<'r>,
        submitter: &'s Submitter<'r>,
        bufs: &'s mut FixedBuffers,
        now: Instant,
    ) -> Self {
        RingCtx {
            sq,
            submitter,
            bufs,
            slot: 0,
            now,
            record: None,
        }
    }

    /// A context whose operations are only recorded in `record` (by tag), never submitted:
    /// the fuzz harnesses answer them with made-up results.
    #[cfg(any(test, feature = "fuzz"))]
    pub(super) fn recording(
        sq: &'s mut SubmissionQueue<'r>,
        submitter: &'s Submitter<'r>,
        bufs: &'s mut FixedBuffers,
        now: Instant,
        record: &'s mut Vec<u32>,
    ) -> Self {
        RingCtx {
            sq,
            submitter,
            bufs,
            slot: 0,
            now,
            record: Some(record),
        }
    }

    /// The fixed buffer (index in the ring's table) holding all of `[addr, addr + len)`,
    /// registering its chunk on first use; `None`: use a vectored operation.
    pub fn fixed_buffer(&mut self, addr: usize, len: usize) -> Option<u16> {
        self.bufs.index(self.submitter, addr, len)
    }

    /// Queues `entry`, tagged so its completion comes back to this queue's
    /// [`QueueHandler::complete`] with `tag`. Submits early only if the SQ is full.
    ///
    /// # Safety
    /// Every buffer and iovec array `entry` points to must stay valid and unmoved until its
    /// completion has been passed to [`QueueHandler::complete`].
    pub unsafe fn push(&mut self, entry: squeue::Entry, tag: u32) -> io::Result<()> {
        #[cfg(any(test, feature = "fuzz"))]
        if let Some(r) = self.record.as_mut() {
            r.push(tag);
            return Ok(());
        }
        let e = entry.user_data(user_data(KIND_IO, self.slot, tag));
        loop {
            // SAFETY: forwarded from the caller's contract.
            if unsafe { self.sq.push(&e) }.is_ok() {
                return Ok(());
            }
            self.sq.sync();
            self.submitter.submit()?;
            self.sq.sync();
        }
    }
}

pub(super) struct QueueSlot {
    pub(super) device: u64,
    pub(super) handler: Box<dyn QueueHandler>,
    pub(super) kick_armed: bool,
    /// The kick poll failed for good; only polling (or nothing) serves the queue now.
    pub(super) kick_dead: bool,
    /// A kick (or a full batch) says there may be requests to pop.
    pub(super) pending: bool,
    pub(super) polling: bool,
    pub(super) poll_until: Instant,
    /// The adaptive busy-poll window, at most `poll_max` (see `poll::adapt`).
    pub(super) window: Duration,
    /// The most the window grows to: the handler's `poll_window()` until the control plane
    /// sets another (`Command::SetPollMax`); zero: never poll.
    pub(super) poll_max: Duration,
    /// One of the queue's operations completed since its last turn in a pass.
    pub(super) completed: bool,
    /// The queue's last pop or completion.
    pub(super) last_activity: Instant,
    /// When the queue last stopped polling and re-enabled guest notifications.
    pub(super) slept_at: Option<Instant>,
    /// Notifications were turned on for a reactor's wait on in-flight I/O while the queue
    /// polls; they go off again as the wait returns.
    pub(super) notify_in_wait: bool,
    pub(super) draining: bool,
    pub(super) cancel_sent: bool,
    pub(super) has_file: bool,
    /// The counters as of the previous snapshot (snapshots carry what was counted since).
    pub(super) reported: QueueCounters,
}

impl QueueSlot {
    pub(super) fn new(device: u64, handler: Box<dyn QueueHandler>, has_file: bool) -> Self {
        let now = Instant::now();
        QueueSlot {
            device,
            window: handler.poll_window().unwrap_or(Duration::ZERO),
            poll_max: handler.poll_window().unwrap_or(Duration::ZERO),
            handler,
            kick_armed: false,
            kick_dead: false,
            // Requests may already sit in the ring from before activation.
            pending: true,
            notify_in_wait: false,
            polling: false,
            poll_until: now,
            completed: false,
            last_activity: now,
            slept_at: None,
            draining: false,
            cancel_sent: false,
            has_file,
            reported: QueueCounters::default(),
        }
    }
}

/// Result of one [`Reactor::turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Running,
    Stopped,
}

/// A reactor: ring, queues, control channel.
pub struct Reactor {
    index: usize,
    ring: IoUring,
    rx: Receiver<Command>,
    wake: EventFd,
    wake_armed: bool,
    wake_pending: bool,
    queues: Vec<Option<QueueSlot>>,
    detaches: Vec<(u64, SyncSender<()>)>,
    stopping: Option<SyncSender<Report>>,
    /// Metrics of queues dropped since the previous snapshot (see `snapshot::retire`).
    retired: Vec<QueueMetrics>,
    metrics: ReactorMetrics,
    started: Instant,
    in_flight_policy: InFlightPolicy,
    adaptive_poll: bool,
    /// Moving average of how long a wait for in-flight I/O took, ns.
    /// Since when I/O has been in flight without a break.
    busy_since: Option<Instant>,
    /// Moving average of those stretches, ns.
    service_ewma_ns: u64,
    /// The ring's sparse table of fixed buffers over guest memory (off by option or after a
    /// failed registration).
    bufs: FixedBuffers,
    /// Poll-window maxima set by the control plane, per device, for queues attached later
    /// (a driver that resets its device re-attaches its queues).
    poll_overrides: Vec<(Range<u64>, Duration)>,
}

impl Reactor {
    /// Builds the ring (with a sparse fixed-file table) and arms the wake-up poll.
    pub(crate) fn new(
        index: usize,
        core: usize,
        opts: &ReactorOptions,
        rx: Receiver<Command>,
        wake: EventFd,
    ) -> io::Result<Self> {
        let ring = super::ring::build_ring(opts)?;
        // Grows to the highest slot in use (passes scan only that far), never reallocates.
        let queues = Vec::with_capacity(MAX_QUEUES_PER_REACTOR);
        Ok(Reactor {
            index,
            ring,
            rx,
            wake,
            wake_armed: false,
            wake_pending: false,
            queues,
            detaches: Vec::new(),
            stopping: None,
            retired: Vec::new(),
            metrics: ReactorMetrics {
                index,
                core,
                ..Default::default()
            },
            started: Instant::now(),
            in_flight_policy: opts.in_flight,
            adaptive_poll: opts.adaptive_poll,
            busy_since: None,
            service_ewma_ns: 0,
            bufs: FixedBuffers::new(opts.fixed_buffers),
            poll_overrides: Vec::new(),
        })
    }

    /// Creates a reactor driven by the calling thread, and the sender to control it. For
    /// benches and tests: `attach_local` + `turn` without a pool.
    pub fn new_local(opts: &ReactorOptions) -> io::Result<(Reactor, LocalControl)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let r = Reactor::new(0, 0, opts, rx, wake)?;
        Ok((r, LocalControl { _tx: tx }))
    }

    /// Attaches a queue directly (for a reactor driven inline).
    pub fn attach_local(&mut self, device: u64, factory: HandlerFactory) -> Result<(), String> {
        self.attach(device, factory)
    }

    /// Detaches a device from a reactor driven inline: drains its queues with non-blocking
    /// passes. Fails if they do not drain within `max_passes`.
    pub fn detach_local(&mut self, device: u64, max_passes: usize) -> io::Result<()> {
        let (ack, rx) = std::sync::mpsc::sync_channel(1);
        self.begin_drain(Some(device));
        self.detaches.push((device, ack));
        for _ in 0..max_passes {
            self.turn_nowait()?;
            if rx.try_recv().is_ok() {
                return Ok(());
            }
        }
        Err(io::Error::other(format!(
            "device {device} did not drain in {max_passes} passes"
        )))
    }

    /// Runs passes until the reactor has stopped or its ring failed.
    pub(crate) fn run(mut self) -> io::Result<()> {
        while self.turn()? == Turn::Running {}
        Ok(())
    }

    fn attach(&mut self, device: u64, factory: HandlerFactory) -> Result<(), String> {
        if self.stopping.is_some() {
            return Err("the reactor is stopping".into());
        }
        let slot = match self.queues.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.queues.len() < MAX_QUEUES_PER_REACTOR => {
                self.queues.push(None);
                self.queues.len() - 1
            }
            None => {
                let n = MAX_QUEUES_PER_REACTOR;
                return Err(format!("reactor{} already serves {n} queues", self.index));
            }
        };
        let alt = slot + MAX_QUEUES_PER_REACTOR;
        let handler = factory(AttachCtx {
            reactor: self.index,
            fixed_file: slot as u32,
            alt_fixed_file: alt as u32,
        })?;
        let mut has_file = false;
        for (index, fd) in [(slot, handler.file_fd()), (alt, handler.alt_file_fd())] {
            if let Some(fd) = fd {
                self.ring
                    .submitter()
                    .register_files_update(index as u32, &[fd])
                    .map_err(|e| format!("cannot register the disk file with io_uring: {e}"))?;
                has_file = true;
            }
        }
        self.register_buffers(&*handler);
        let mut q = QueueSlot::new(device, handler, has_file);
        if let Some((_, max)) = self
            .poll_overrides
            .iter()
            .find(|(k, _)| k.contains(&device))
        {
            set_poll_max(&mut q, *max);
        }
        self.queues[slot] = Some(q);
        Ok(())
    }

    /// Applies a poll-window maximum to `device`'s queues; returns how many it changed.
    fn set_poll_max(&mut self, keys: Range<u64>, max: Duration) -> usize {
        match self.poll_overrides.iter_mut().find(|(k, _)| *k == keys) {
            Some(e) => e.1 = max,
            None => self.poll_overrides.push((keys.clone(), max)),
        }
        let mut n = 0;
        for q in self.queues.iter_mut().flatten() {
            if keys.contains(&q.device) && set_poll_max(q, max) {
                n += 1;
            }
        }
        n
    }

    /// Lays the queue's guest memory over the ring's sparse buffer table, once (one VM per
    /// process: every queue sees the same memory); chunks are registered on first use.
    fn register_buffers(&mut self, handler: &dyn QueueHandler) {
        if !self.bufs.enabled() || self.bufs.active() {
            return;
        }
        let regions = handler.guest_memory();
        if regions.is_empty() {
            return;
        }
        if let Err(e) = self
            .ring
            .submitter()
            .register_buffers_sparse(super::buffers::TABLE_ENTRIES)
        {
            log::info!(
                "reactor{}: no io_uring fixed buffers ({e}); requests use readv/writev",
                self.index
            );
            self.bufs.disable();
            return;
        }
        self.bufs.set_memory(&regions);
    }

    fn begin_drain(&mut self, device: Option<u64>) {
        for q in self.queues.iter_mut().flatten() {
            if device.is_none_or(|d| d == q.device) {
                q.draining = true;
            }
        }
    }

    fn handle_commands(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Attach {
                    device,
                    factory,
                    ack,
                }) => {
                    let _ = ack.send(self.attach(device, factory));
                }
                Ok(Command::Detach { device, ack }) => {
                    self.begin_drain(Some(device));
                    self.detaches.push((device, ack));
                }
                Ok(Command::Snapshot { mut buf, ack }) => {
                    snapshot::fill(&mut buf, &mut self.queues, &mut self.retired, &self.metrics);
                    let _ = ack.send(buf);
                }
                Ok(Command::SetPollMax { keys, max, ack }) => {
                    let _ = ack.send(self.set_poll_max(keys, max));
                }
                Ok(Command::Stop { ack }) => {
                    self.begin_drain(None);
                    self.stopping = Some(ack);
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // The pool is gone without a stop: drain and exit quietly.
                    if self.stopping.is_none() {
                        self.begin_drain(None);
                        self.stopping = Some(std::sync::mpsc::sync_channel(1).0);
                    }
                    return;
                }
            }
        }
    }

    /// Frees the slots of drained queues whose last completion came back, answers finished
    /// detaches and, when stopping with nothing left, the stop. Returns true once stopped.
    fn finish_drains(&mut self) -> bool {
        if self.detaches.is_empty() && self.stopping.is_none() {
            return false;
        }
        for i in 0..self.queues.len() {
            let done = matches!(&self.queues[i], Some(q) if q.draining && !q.kick_armed && q.handler.in_flight() == 0);
            if !done {
                continue;
            }
            let mut q = self.queues[i].take().expect("checked above");
            q.handler.publish();
            if q.has_file {
                for index in [i, i + MAX_QUEUES_PER_REACTOR] {
                    if let Err(e) = self
                        .ring
                        .submitter()
                        .register_files_update(index as u32, &[-1])
                    {
                        log::error!(
                            "reactor{}: cannot unregister the files of queue slot {i}: {e}",
                            self.index
                        );
                    }
                }
            }
            snapshot::retire(&mut self.retired, &mut q);
        }
        while matches!(self.queues.last(), Some(None)) {
            self.queues.pop();
        }
        if self.queues.is_empty() && self.bufs.active() {
            if let Err(e) = self.ring.submitter().unregister_buffers() {
                log::error!(
                    "reactor{}: cannot unregister the fixed buffers: {e}",
                    self.index
                );
            }
            self.bufs.clear();
        }
        let queues = &self.queues;
        self.detaches.retain(|(dev, ack)| {
            let busy = queues.iter().flatten().any(|q| q.device == *dev);
            if !busy {
                let _ = ack.send(());
            }
            busy
        });
        if self.stopping.is_some() && self.queues.iter().all(Option::is_none) {
            let report = self.report();
            if let Some(ack) = self.stopping.take() {
                let _ = ack.send(report);
            }
            return true;
        }
        false
    }

    /// One pass: commands, pops, publish, one submit (waiting when idle), reap, publish.
    pub fn turn(&mut self) -> io::Result<Turn> {
        self.pass(true)
    }

    /// One pass that never blocks (for reactors driven inline by benches and fuzzers).
    pub fn turn_nowait(&mut self) -> io::Result<Turn> {
        self.pass(false)
    }

    fn pass(&mut self, may_wait: bool) -> io::Result<Turn> {
        let t0 = Instant::now();
        self.metrics.passes += 1;
        if self.wake_pending {
            self.wake_pending = false;
            self.handle_commands();
        }
        let stopped = self.finish_drains();
        if stopped {
            return Ok(Turn::Stopped);
        }

        let Reactor {
            ring,
            queues,
            wake,
            wake_armed,
            in_flight_policy,
            adaptive_poll,
            busy_since,
            service_ewma_ns,
            bufs,
            ..
        } = self;
        let (submitter, mut sq, _) = ring.split();
        if !*wake_armed {
            let e = opcode::PollAdd::new(types::Fd(wake.as_raw_fd()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(KIND_WAKE, 0, 0));
            // SAFETY: a poll SQE references no memory.
            push_raw(&mut sq, &submitter, &e)?;
            *wake_armed = true;
        }
        let adaptive = *adaptive_poll;
        let mut more = false;
        let mut polls = false;
        let mut in_flight = 0;
        for (i, slot) in queues.iter_mut().enumerate() {
            let Some(q) = slot else { continue };
            if q.draining {
                if q.kick_armed && !q.cancel_sent {
                    let e = opcode::AsyncCancel::new(user_data(KIND_KICK, i, 0))
                        .build()
                        .user_data(user_data(KIND_CANCEL, i, 0));
                    push_raw(&mut sq, &submitter, &e)?;
                    q.cancel_sent = true;
                }
                in_flight += q.handler.io_in_flight();
                continue;
            }
            if !q.kick_armed && !q.kick_dead {
                let e = opcode::PollAdd::new(types::Fd(q.handler.kick_fd()), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(user_data(KIND_KICK, i, 0));
                push_raw(&mut sq, &submitter, &e)?;
                q.kick_armed = true;
            }
            let state = run_queue(
                q,
                &mut RingCtx {
                    sq: &mut sq,
                    submitter: &submitter,
                    bufs,
                    slot: i,
                    now: t0,
                    #[cfg(any(test, feature = "fuzz"))]
                    record: None,
                },
                adaptive,
            );
            match state {
                QueueState::More => more = true,
                QueueState::Poll => polls = true,
                QueueState::Idle => {}
            }
            in_flight += q.handler.io_in_flight();
            q.handler.publish();
        }
        if in_flight > 0 && busy_since.is_none() {
            *busy_since = Some(t0);
        }
        sq.sync();
        let to_submit = sq.len();
        let taskrun = sq.taskrun() || sq.cq_overflow();
        drop(sq);

        // How to enter the kernel this pass (README, "The reactor"):
        // - a queue has more requests than one batch: submit, reap, go on;
        // - a queue polls and I/O is in flight: as the in-flight policy says (yield the core
        //   to whatever completes the I/O and spin, or wait in the kernel for a completion);
        // - a queue polls and nothing is in flight: spin, entering the kernel only when there
        //   is something to submit or the ring flags completion work;
        // - every queue sleeps with notifications on: block until a kick, a completion or a
        //   control message.
        let t1 = Instant::now();
        self.metrics.busy_ns += (t1 - t0).as_nanos() as u64;
        let mut blocked = false;
        let r = if !may_wait || more {
            Some(submitter.submit_and_wait(0))
        } else if polls {
            let policy = choose_in_flight(
                *in_flight_policy,
                in_flight,
                Duration::from_nanos(*service_ewma_ns),
            );
            if in_flight > 0 && policy == InFlightPolicy::Yield {
                // SAFETY: sched_yield takes no arguments and has no failure that matters.
                unsafe { libc::sched_yield() };
                Some(submitter.submit_and_wait(0))
            } else if in_flight > 0 && policy == InFlightPolicy::Wait {
                // Sleep in the kernel until the completion, a kick or a control message,
                // with no timer: an armed timer costs about 15 µs a wait on the lab's nested
                // host, and timed waits fed that cost back into the estimate that chose them
                // (a control-plane request's hiccup left the reactor in timed waits with 19k
                // timer interrupts a second; perf/RESULTS.md, "Control plane"). Polling
                // queues turn guest notifications on first, so a request added meanwhile
                // kicks (and wakes the wait) instead of waiting for the I/O to complete.
                if notify_for_wait(queues) {
                    Some(submitter.submit_and_wait(0))
                } else {
                    blocked = true;
                    Some(submitter.submit_and_wait(1))
                }
            } else {
                (to_submit > 0 || taskrun).then(|| submitter.submit_and_wait(0))
            }
        } else {
            blocked = true;
            Some(submitter.submit_and_wait(1))
        };
        if let Some(r) = r {
            self.metrics.enters += 1;
            match r {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN | libc::ETIME)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        let t2 = Instant::now();
        // Notifications off again before any completion is published: the driver answers a
        // completion with its next request at once, and must not kick for it.
        for q in self.queues.iter_mut().flatten() {
            if std::mem::take(&mut q.notify_in_wait) {
                q.handler.set_notify(false);
            }
        }
        let waited = (t2 - t1).as_nanos() as u64;
        if blocked {
            self.metrics.idle_ns += waited;
        } else {
            self.metrics.busy_ns += waited;
        }
        let completed = self.reap(t2)?;
        if completed > 0 {
            // How long I/O takes to come back once some is in flight (at QD1: the service
            // time).
            if let Some(since) = self.busy_since.take() {
                let d = t2.saturating_duration_since(since).as_nanos() as u64;
                self.service_ewma_ns = ewma(self.service_ewma_ns, d);
            }
        }
        self.metrics.busy_ns += t2.elapsed().as_nanos() as u64;
        Ok(Turn::Running)
    }

    /// Reaps every completion; returns how many were I/O of a queue.
    fn reap(&mut self, now: Instant) -> io::Result<usize> {
        let index = self.index;
        let Reactor {
            ring,
            queues,
            wake_armed,
            wake_pending,
            bufs,
            ..
        } = self;
        let (submitter, mut sq, mut cq) = ring.split();
        let mut completed = 0;
        cq.sync();
        for cqe in &mut cq {
            let (kind, slot, tag) = decode(cqe.user_data());
            let res = cqe.result();
            match kind {
                KIND_WAKE => {
                    *wake_pending = true;
                    if !cqueue::more(cqe.flags()) {
                        *wake_armed = false;
                    }
                }
                KIND_CANCEL => {}
                KIND_KICK => {
                    let Some(q) = queues.get_mut(slot).and_then(Option::as_mut) else {
                        log::error!("reactor{index}: kick completion for empty queue slot {slot}");
                        continue;
                    };
                    if res >= 0 {
                        q.pending = true;
                        q.handler.kicked(now);
                    } else if res != -libc::ECANCELED {
                        log::error!("reactor{index}: polling the kick eventfd of queue slot {slot} failed: {}", io::Error::from_raw_os_error(-res));
                        q.kick_dead = true;
                    }
                    if !cqueue::more(cqe.flags()) {
                        q.kick_armed = false;
                    }
                }
                _ => {
                    debug_assert_eq!(kind, KIND_IO);
                    completed += 1;
                    let Some(q) = queues.get_mut(slot).and_then(Option::as_mut) else {
                        log::error!("reactor{index}: I/O completion for empty queue slot {slot}");
                        continue;
                    };
                    q.completed = true;
                    q.handler.complete(
                        &mut RingCtx {
                            sq: &mut sq,
                            submitter: &submitter,
                            bufs,
                            slot,
                            now,
                            #[cfg(any(test, feature = "fuzz"))]
                            record: None,
                        },
                        tag,
                        res,
                    );
                }
            }
        }
        drop(cq);
        for q in queues.iter_mut().flatten() {
            q.handler.publish();
        }
        sq.sync();
        Ok(completed)
    }

    /// What this reactor recorded since its previous snapshot, as a copy: for a reactor
    /// driven inline, which nothing snapshots, everything since it started.
    pub fn report(&self) -> Report {
        snapshot::report(
            &self.queues,
            &self.retired,
            &self.metrics,
            self.started.elapsed(),
        )
    }
}

/// A moving average that gives each new sample 1/8 of the weight.
/// Turns guest notifications on for every polling queue before the reactor waits for
/// in-flight I/O (each queue's next turn turns them off again); returns true when a queue
/// has new requests already, so the reactor must not sleep.
fn notify_for_wait(queues: &mut [Option<QueueSlot>]) -> bool {
    let mut arrived = false;
    for q in queues.iter_mut().flatten() {
        if q.polling && !q.draining && !q.notify_in_wait {
            q.notify_in_wait = true;
            if q.handler.set_notify(true) {
                q.pending = true;
                arrived = true;
            }
        }
    }
    arrived
}

fn ewma(avg: u64, sample: u64) -> u64 {
    avg - avg / 8 + sample / 8
}

/// Keeps the control channel of a [`Reactor::new_local`] reactor open.
pub struct LocalControl {
    _tx: std::sync::mpsc::Sender<Command>,
}

fn push_raw(
    sq: &mut SubmissionQueue<'_>,
    submitter: &Submitter<'_>,
    e: &squeue::Entry,
) -> io::Result<()> {
    loop {
        // SAFETY: only used for poll and cancel entries, which reference no user memory.
        if unsafe { sq.push(e) }.is_ok() {
            return Ok(());
        }
        sq.sync();
        submitter.submit()?;
        sq.sync();
    }
}
