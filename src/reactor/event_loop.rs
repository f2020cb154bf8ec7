//! One reactor: an io_uring, the queues it serves, and the loop that drives them.
//!
//! [`Reactor`] is usable on any thread (the pool runs it on a pinned thread; benches and
//! tests may drive it inline with [`Reactor::turn`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring, SubmissionQueue, Submitter};
use vmm_sys_util::eventfd::EventFd;

use super::{AttachCtx, HandlerFactory, QueueHandler, ReactorOptions, MAX_QUEUES_PER_REACTOR};
use crate::metrics::{ReactorMetrics, Report};

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
    Snapshot {
        ack: SyncSender<Report>,
    },
    Stop {
        ack: SyncSender<Report>,
    },
}

/// What a queue handler sees of the ring during a pass.
pub struct RingCtx<'s, 'r> {
    sq: &'s mut SubmissionQueue<'r>,
    submitter: &'s Submitter<'r>,
    slot: usize,
    /// Time the current phase of the pass started (one clock read per phase, not per request).
    pub now: Instant,
}

impl RingCtx<'_, '_> {
    /// Queues `entry`, tagged so its completion comes back to this queue's
    /// [`QueueHandler::complete`] with `tag`. Submits early only if the SQ is full.
    ///
    /// # Safety
    /// Every buffer and iovec array `entry` points to must stay valid and unmoved until its
    /// completion has been passed to [`QueueHandler::complete`].
    pub unsafe fn push(&mut self, entry: squeue::Entry, tag: u32) -> io::Result<()> {
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

struct QueueSlot {
    device: u64,
    handler: Box<dyn QueueHandler>,
    kick_armed: bool,
    /// The kick poll failed for good; only polling (or nothing) serves the queue now.
    kick_dead: bool,
    /// A kick (or a full batch) says there may be requests to pop.
    pending: bool,
    polling: bool,
    poll_until: Instant,
    draining: bool,
    cancel_sent: bool,
    has_file: bool,
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
    retired: Report,
    metrics: ReactorMetrics,
    started: Instant,
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
        let mut b = IoUring::builder();
        b.setup_cqsize(opts.ring_entries.saturating_mul(4).max(64));
        if opts.sqpoll {
            b.setup_sqpoll(opts.sqpoll_idle_ms);
        }
        let ring = b.build(opts.ring_entries.max(8))?;
        probe_opcodes(&ring)?;
        ring.submitter()
            .register_files_sparse(2 * MAX_QUEUES_PER_REACTOR as u32)?;
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
            retired: Report::default(),
            metrics: ReactorMetrics {
                index,
                core,
                ..Default::default()
            },
            started: Instant::now(),
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
        self.queues[slot] = Some(QueueSlot {
            device,
            handler,
            kick_armed: false,
            kick_dead: false,
            // Requests may already sit in the ring from before activation.
            pending: true,
            polling: false,
            poll_until: Instant::now(),
            draining: false,
            cancel_sent: false,
            has_file,
        });
        Ok(())
    }

    fn begin_drain(&mut self, device: Option<u64>) {
        for q in self.queues.iter_mut().flatten() {
            if device.is_none_or(|d| d == q.device) {
                q.draining = true;
            }
        }
    }

    fn snapshot(&self) -> Report {
        let mut r = self.retired.clone();
        for q in self.queues.iter().flatten() {
            r.add_queue(q.handler.metrics());
        }
        r.reactors.push(self.metrics.clone());
        r.elapsed = self.started.elapsed();
        r
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
                Ok(Command::Snapshot { ack }) => {
                    let _ = ack.send(self.snapshot());
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
            self.retired.add_queue(q.handler.metrics());
        }
        while matches!(self.queues.last(), Some(None)) {
            self.queues.pop();
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
            let report = self.snapshot();
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
        let mut busy = false;
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
            busy |= run_queue(
                q,
                &mut RingCtx {
                    sq: &mut sq,
                    submitter: &submitter,
                    slot: i,
                    now: t0,
                },
            );
            q.handler.publish();
        }
        sq.sync();
        drop(sq);

        let want = usize::from(may_wait && !busy);
        let t1 = Instant::now();
        self.metrics.busy_ns += (t1 - t0).as_nanos() as u64;
        self.metrics.enters += 1;
        match submitter.submit_and_wait(want) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        let t2 = Instant::now();
        let waited = (t2 - t1).as_nanos() as u64;
        if want > 0 {
            self.metrics.idle_ns += waited;
        } else {
            self.metrics.busy_ns += waited;
        }
        self.reap(t2)?;
        self.metrics.busy_ns += t2.elapsed().as_nanos() as u64;
        Ok(Turn::Running)
    }

    fn reap(&mut self, now: Instant) -> io::Result<()> {
        let index = self.index;
        let Reactor {
            ring,
            queues,
            wake_armed,
            wake_pending,
            ..
        } = self;
        let (submitter, mut sq, mut cq) = ring.split();
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
                    let Some(q) = queues.get_mut(slot).and_then(Option::as_mut) else {
                        log::error!("reactor{index}: I/O completion for empty queue slot {slot}");
                        continue;
                    };
                    q.handler.complete(
                        &mut RingCtx {
                            sq: &mut sq,
                            submitter: &submitter,
                            slot,
                            now,
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
        Ok(())
    }

    /// Snapshot of this reactor (for inline use).
    pub fn report(&self) -> Report {
        self.snapshot()
    }
}

/// Fails with a clear message when the kernel lacks an opcode the reactors use.
fn probe_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::other(format!(
                "the kernel's io_uring lacks IORING_OP_{name} (Linux 5.19 or newer is needed)"
            )));
        }
    }
    Ok(())
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

/// Pops one bounded batch from `q` if it may have work. Returns true when the queue wants
/// another pass without sleeping (more requests or busy-polling).
fn run_queue(q: &mut QueueSlot, ctx: &mut RingCtx<'_, '_>) -> bool {
    if !q.pending && !q.polling {
        return false;
    }
    let kicked = q.pending;
    q.pending = false;
    if !q.polling {
        q.handler.set_notify(false);
    }
    let n = q.handler.poll_avail(ctx, super::BATCH_MAX);
    if q.polling && n > 0 && !kicked {
        q.handler.poll_hit();
    }
    let window = q.handler.poll_window();
    if n >= super::BATCH_MAX {
        q.pending = true;
        if let Some(w) = window {
            q.polling = true;
            q.poll_until = ctx.now + w;
        }
        return true;
    }
    if let Some(w) = window {
        if n > 0 {
            q.polling = true;
            q.poll_until = ctx.now + w;
            return true;
        }
        if q.polling && ctx.now < q.poll_until {
            return true;
        }
        q.polling = false;
    }
    if q.handler.set_notify(true) {
        q.pending = true;
        return true;
    }
    false
}
