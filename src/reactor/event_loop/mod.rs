//! One reactor: an io_uring, the queues it serves, and the loop that drives them.
//!
//! [`Reactor`] is usable on any thread (the pool runs it on a pinned thread; benches and
//! tests may drive it inline with [`Reactor::turn`]).
//!
//! By concern: [`ctx`] (what a handler sees of the ring, the user_data encoding), [`setup`]
//! (attaching a queue: fixed files and buffers), [`control`] (messages from other threads),
//! [`drain`] (detach and stop), [`pass`] (one turn of the loop and the reaping of completions).

mod control;
mod ctx;
mod drain;
mod pass;
mod setup;
mod snapshot;

pub(crate) use control::Command;
pub use ctx::RingCtx;

use std::io;
use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use io_uring::IoUring;
use vmm_sys_util::eventfd::EventFd;

use super::buffers::FixedBuffers;
use super::{HandlerFactory, InFlightPolicy, QueueHandler, ReactorOptions, MAX_QUEUES_PER_REACTOR};
use crate::metrics::{QueueCounters, QueueRecorder, ReactorMetrics, Report};

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
    retired: Vec<QueueRecorder>,
    metrics: ReactorMetrics,
    started: Instant,
    in_flight_policy: InFlightPolicy,
    adaptive_poll: bool,
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

    /// One pass: commands, pops, publish, one submit (waiting when idle), reap, publish.
    pub fn turn(&mut self) -> io::Result<Turn> {
        self.pass(true)
    }

    /// One pass that never blocks (for reactors driven inline by benches and fuzzers).
    pub fn turn_nowait(&mut self) -> io::Result<Turn> {
        self.pass(false)
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

/// Keeps the control channel of a [`Reactor::new_local`] reactor open.
pub struct LocalControl {
    _tx: std::sync::mpsc::Sender<Command>,
}
