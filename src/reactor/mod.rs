//! Per-core io_uring reactors.
//!
//! A [`ReactorPool`] runs one thread per I/O core (`reactor0`, `reactor1`, … in the order of
//! [`ReactorOptions::cores`]), each pinned and owning one io_uring. Device queues are handed
//! to a reactor by message: [`PoolHandle::attach`] sends a [`HandlerFactory`] that builds the
//! queue's [`QueueHandler`] *on the reactor thread* (so its slots, iovec arrays and metrics are
//! allocated there and never cross threads again), then wakes the reactor through an eventfd
//! the reactor itself polls through its ring. Nothing on the data path is shared with other
//! threads: snapshots, detaches and stop are messages too, answered on a channel that the
//! caller waits on with a timeout ([`CONTROL_TIMEOUT`]) so a stuck reactor cannot hang a vCPU.
//!
//! The ring watches every queue's kick eventfd with a multishot POLL_ADD (edge-triggered: one
//! completion per ioeventfd write, and the eventfd never needs to be read), so a pass is:
//! reap completions (kicks, I/O, wake-ups) → let each kicked or polling queue pop a bounded
//! batch ([`BATCH_MAX`]) and queue its SQEs → publish used entries and interrupts once per
//! queue → one `io_uring_enter` that submits everything and waits when there is nothing to do.
//! Each queue's data file is registered in the ring's fixed-file table at the queue's slot.

mod buffers;
mod event_loop;
#[cfg(any(test, feature = "fuzz"))]
pub mod inline;
mod poll;
mod pool;
mod ring;
mod snapshot;

pub use event_loop::{LocalControl, Reactor, RingCtx};
pub use pool::{DeviceKindOrdinal, PoolHandle, ReactorPool};
pub use ring::{build_ring, ring_restrictions};

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::metrics::QueueRecorder;

/// Most requests a queue pops in one pass, so one busy queue cannot starve the others.
pub const BATCH_MAX: usize = 64;
/// Below this moving-average service time, a lone in-flight request is waited for in the
/// kernel under [`InFlightPolicy::Hybrid`].
pub const FAST_SERVICE: Duration = Duration::from_micros(10);
/// Most queues (of all devices) one reactor serves; its fixed-file table has two entries per queue.
pub const MAX_QUEUES_PER_REACTOR: usize = 256;
/// How long a control message (attach, detach, snapshot, stop) may take before the caller
/// gives up and logs an error.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start the reactor pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactorOptions {
    /// One reactor per entry, pinned to that core.
    pub cores: Vec<usize>,
    /// Let a kernel thread poll the submission queue (IORING_SETUP_SQPOLL).
    pub sqpoll: bool,
    /// Idle time after which the SQPOLL thread sleeps, ms.
    pub sqpoll_idle_ms: u32,
    /// Submission queue entries per ring (completion queue is 4×).
    pub ring_entries: u32,
    /// IORING_SETUP_DEFER_TASKRUN (else COOP_TASKRUN): completions are posted only when the
    /// reactor asks for them.
    pub defer_taskrun: bool,
    /// What a polling reactor does while I/O is in flight.
    pub in_flight: InFlightPolicy,
    /// Grow and shrink each queue's busy-poll window with what polling finds (else fixed).
    pub adaptive_poll: bool,
    /// Register guest memory as io_uring fixed buffers (READ_FIXED/WRITE_FIXED for
    /// single-buffer requests: no page-table walk and page pinning per request).
    pub fixed_buffers: bool,
    /// The seccomp filter each reactor thread installs (crate::seccomp; `Off` by default, so
    /// that library users and tests opt in; a VM passes its `--seccomp`).
    pub seccomp: crate::seccomp::SeccompMode,
    /// Restrict each ring to the opcodes and register operations the reactors use
    /// ([`ring_restrictions`]); a VM turns it off only with `--seccomp off`.
    pub restrict_ring: bool,
}

impl ReactorOptions {
    /// Applies `RINGVM_REACTOR` (comma-separated `defer|nodefer`, `hybrid|yield|wait|spin`,
    /// `adaptive|fixed`, `bufs|nobufs`): the switches the A/B measurements in perf/RESULTS.md flip.
    pub fn with_env_overrides(mut self) -> Self {
        let Ok(v) = std::env::var("RINGVM_REACTOR") else {
            return self;
        };
        for word in v.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "defer" => self.defer_taskrun = true,
                "nodefer" => self.defer_taskrun = false,
                "wait" => self.in_flight = InFlightPolicy::Wait,
                "spin" => self.in_flight = InFlightPolicy::Spin,
                "yield" => self.in_flight = InFlightPolicy::Yield,
                "hybrid" => self.in_flight = InFlightPolicy::Hybrid,
                "adaptive" => self.adaptive_poll = true,
                "fixed" => self.adaptive_poll = false,
                "bufs" => self.fixed_buffers = true,
                "nobufs" => self.fixed_buffers = false,
                other => log::warn!("RINGVM_REACTOR: ignoring unknown switch `{other}`"),
            }
        }
        self
    }
}

impl Default for ReactorOptions {
    fn default() -> Self {
        ReactorOptions {
            cores: vec![0],
            sqpoll: false,
            sqpoll_idle_ms: 100,
            ring_entries: 256,
            defer_taskrun: true,
            in_flight: InFlightPolicy::Hybrid,
            adaptive_poll: true,
            fixed_buffers: true,
            seccomp: crate::seccomp::SeccompMode::Off,
            restrict_ring: true,
        }
    }
}

/// What a reactor whose queues poll does while their I/O is in flight. The threads that
/// complete the I/O (io-wq workers for files without non-blocking reads, such as tmpfs;
/// softirqs) often run on the reactor's own core, where a spinning reactor only delays them;
/// a disk that completes through an interrupt elsewhere is served best by spinning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlightPolicy {
    /// `Wait` while a single request is in flight and requests have been completing fast
    /// (within [`FAST_SERVICE`]: a completion another thread brings on this core, and
    /// nothing to batch), else `Yield`.
    Hybrid,
    /// Spin, and give the core to any other runnable thread once per pass (`sched_yield`):
    /// spinning when nothing else needs the core, out of the way when something does.
    Yield,
    /// Wait in the kernel for a completion, at most until the poll window ends.
    Wait,
    /// Spin.
    Spin,
}

/// Errors of the reactor pool.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    #[error("The reactor pool needs at least one core")]
    NoCores,
    #[error("Failed to set up the io_uring of reactor{index} (needs Linux 5.19 or newer for sparse fixed files)")]
    Ring {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to create an eventfd for reactor{index}")]
    EventFd {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to start reactor{index}")]
    Spawn {
        index: usize,
        #[source]
        source: crate::vmm::thread::ThreadError,
    },
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("Reactor{index} does not exist (the pool has {len})")]
    NoSuchReactor { index: usize, len: usize },
    #[error("Reactor{index} has stopped")]
    Gone { index: usize },
    #[error("Reactor{index} did not answer within {timeout_ms} ms")]
    Timeout { index: usize, timeout_ms: u128 },
    #[error("Reactor{index} refused the queue: {message}")]
    Attach { index: usize, message: String },
}

/// Where a queue sits on its reactor, given to the [`HandlerFactory`].
#[derive(Debug, Clone, Copy)]
pub struct AttachCtx {
    /// Index of the reactor in the pool.
    pub reactor: usize,
    /// Index of the queue's entry in the ring's fixed-file table (`types::Fixed(fixed_file)`),
    /// valid when the handler returns a [`QueueHandler::file_fd`].
    pub fixed_file: u32,
    /// Index for [`QueueHandler::alt_file_fd`].
    pub alt_fixed_file: u32,
}

/// Builds a queue's handler on the reactor thread.
pub type HandlerFactory =
    Box<dyn FnOnce(AttachCtx) -> Result<Box<dyn QueueHandler>, String> + Send>;

/// The per-queue state machine a reactor drives. It lives and dies on the reactor thread.
///
/// The reactor calls, per pass: [`kicked`](Self::kicked) for each kick seen,
/// [`poll_avail`](Self::poll_avail) when the queue may have work, [`complete`](Self::complete)
/// for each of its completions, then [`publish`](Self::publish) once.
pub trait QueueHandler {
    /// The eventfd the guest kicks (polled through the ring).
    fn kick_fd(&self) -> RawFd;
    /// A file to register in the ring's fixed-file table at [`AttachCtx::fixed_file`].
    fn file_fd(&self) -> Option<RawFd>;
    /// A second file (the disk opened without O_DIRECT), registered at
    /// [`AttachCtx::alt_fixed_file`].
    fn alt_file_fd(&self) -> Option<RawFd> {
        None
    }
    /// Busy-poll window after activity (`poll-us`), if any: the most the adaptive window
    /// grows to. The control plane may change it later (see [`PoolHandle::set_poll_max`]).
    fn poll_window(&self) -> Option<Duration>;
    /// False for queues that never poll whatever their device's `poll-us` (a control
    /// queue): a live change of the poll window leaves them alone.
    fn may_poll(&self) -> bool {
        true
    }
    /// The reactor saw a kick at `now`.
    fn kicked(&mut self, now: Instant);
    /// Enables (`true`) or disables guest notifications. On enable, returns true when new
    /// requests arrived meanwhile, so the caller must pop again instead of sleeping.
    fn set_notify(&mut self, enable: bool) -> bool;
    /// Pops at most `budget` requests and queues their I/O on `ctx`. Returns how many it popped.
    fn poll_avail(&mut self, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize;
    /// Counts a busy-poll pass that found requests without a kick.
    fn poll_hit(&mut self);
    /// One of this queue's operations completed with `res` (the CQE result).
    fn complete(&mut self, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32);
    /// Publishes the used entries added since the last call: one interrupt if the driver wants one.
    fn publish(&mut self);
    /// Operations queued or submitted and not completed yet.
    fn in_flight(&self) -> usize;
    /// Host ranges of the guest memory this queue's I/O goes to, for the reactor to lay over
    /// its fixed-buffer table (empty: none); see [`RingCtx::fixed_buffer`].
    fn guest_memory(&self) -> Vec<(*mut u8, usize)> {
        Vec::new()
    }
    /// Of those, operations that complete on their own within a service time (disk I/O),
    /// as opposed to reads that wait for outside events (packets): while a polling queue has
    /// such operations, the reactor waits in the kernel for them instead of spinning.
    fn io_in_flight(&self) -> usize {
        0
    }
    /// The queue's metrics (read by the reactor for reports).
    fn metrics(&self) -> &QueueRecorder;
    /// The same, for the reactor to swap a snapshot's empty recorders in
    /// ([`QueueRecorder::take_interval`]).
    fn metrics_mut(&mut self) -> &mut QueueRecorder;
}
