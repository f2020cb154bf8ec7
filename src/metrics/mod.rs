//! Per-queue and per-reactor counters and latency histograms, and the reports built from them.
//!
//! Recording happens on the reactor that owns a queue, into a [`QueueRecorder`] whose
//! [`Recorder`]s are allocated when the queue is attached (bounded range, 3 significant
//! figures, HdrHistogram's layout), so the data path never allocates or locks. Other threads
//! never read these directly: they ask the reactor for a snapshot by message, handing it
//! empty recorders that it swaps with its queues' ([`QueueRecorder::take_interval`]: no
//! copy, no allocation on the reactor); the caller drains what was recorded since the
//! previous snapshot into the HdrHistograms of a cumulative [`Report`] it keeps
//! ([`Report::add_recorded`]), touching only the recorders' written blocks. Reports from
//! several reactors are merged with [`Report::merge`].
//!
//! Formats:
//! - [`Report::table`]: a text table, one row per queue, p50/p90/p99/p99.9/max in µs;
//! - [`Report::to_json`]: the same data as JSON (hand-written), read back by
//!   [`Report::from_json`] (`ringvm ctl stats`);
//! - [`Report::write_hlog`]: an HdrHistogram V2 interval log with one tagged interval per
//!   queue and histogram (`blk0-q1-k2c`, `blk0-q1-svc`, `blk0-q1-batch`), readable by
//!   HdrHistogram's `HistogramLogProcessor` and `hdr-plot`; [`HlogWriter`] appends one
//!   interval per snapshot instead (what was recorded since the previous one).

mod buckets;
mod format;
mod parse;
mod recorder;

pub use buckets::{Buckets, LATENCY_BUCKETS_NS};
pub use format::{pcts, HlogError, HlogWriter};
pub use recorder::Recorder;

use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency the histograms track; slower samples are recorded as this value.
pub const LATENCY_MAX_NS: u64 = 10_000_000_000;
/// Highest batch size the batch histogram tracks.
pub const BATCH_MAX: u64 = 4096;
/// Significant figures kept by every histogram.
pub const SIGFIGS: u8 = 3;

/// Counters of one queue. Plain integers: only the owning reactor writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    /// Requests completed with UNSUPP.
    pub unsupported: u64,
    /// Requests completed with IOERR, or returned without a status byte.
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Kick eventfd wake-ups seen by the reactor.
    pub kicks: u64,
    /// Interrupts written to the irqfd.
    pub irqs_sent: u64,
    /// Batches after which EVENT_IDX said the driver wants no interrupt, or the queue has no vector.
    pub irqs_suppressed: u64,
    /// Passes in busy-poll mode that found new requests without a kick.
    pub poll_hits: u64,
    /// Sum of the kick-to-completion samples, ns (exact; the histogram keeps none).
    pub k2c_sum_ns: u64,
    /// Sum of the service-time samples, ns.
    pub service_sum_ns: u64,
}

impl QueueCounters {
    /// Total requests completed (all types, including failed ones).
    pub fn requests(&self) -> u64 {
        self.reads
            + self.writes
            + self.flushes
            + self.get_ids
            + self.discards
            + self.write_zeroes
            + self.unsupported
    }

    fn add(&mut self, o: &QueueCounters) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.get_ids += o.get_ids;
        self.discards += o.discards;
        self.write_zeroes += o.write_zeroes;
        self.unsupported += o.unsupported;
        self.errors += o.errors;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.kicks += o.kicks;
        self.irqs_sent += o.irqs_sent;
        self.irqs_suppressed += o.irqs_suppressed;
        self.poll_hits += o.poll_hits;
        self.k2c_sum_ns = self.k2c_sum_ns.wrapping_add(o.k2c_sum_ns);
        self.service_sum_ns = self.service_sum_ns.wrapping_add(o.service_sum_ns);
    }

    /// What was counted since `before` (an earlier copy of the same counters).
    pub fn since(&self, before: &QueueCounters) -> QueueCounters {
        QueueCounters {
            reads: self.reads.wrapping_sub(before.reads),
            writes: self.writes.wrapping_sub(before.writes),
            flushes: self.flushes.wrapping_sub(before.flushes),
            get_ids: self.get_ids.wrapping_sub(before.get_ids),
            discards: self.discards.wrapping_sub(before.discards),
            write_zeroes: self.write_zeroes.wrapping_sub(before.write_zeroes),
            unsupported: self.unsupported.wrapping_sub(before.unsupported),
            errors: self.errors.wrapping_sub(before.errors),
            bytes_read: self.bytes_read.wrapping_sub(before.bytes_read),
            bytes_written: self.bytes_written.wrapping_sub(before.bytes_written),
            kicks: self.kicks.wrapping_sub(before.kicks),
            irqs_sent: self.irqs_sent.wrapping_sub(before.irqs_sent),
            irqs_suppressed: self.irqs_suppressed.wrapping_sub(before.irqs_suppressed),
            poll_hits: self.poll_hits.wrapping_sub(before.poll_hits),
            k2c_sum_ns: self.k2c_sum_ns.wrapping_sub(before.k2c_sum_ns),
            service_sum_ns: self.service_sum_ns.wrapping_sub(before.service_sum_ns),
        }
    }
}

/// Metrics of one device queue, owned by the reactor serving it.
#[derive(Debug, Clone)]
pub struct QueueMetrics {
    /// Device name (`blk0` or the disk's `id=`).
    pub device: String,
    pub queue: u16,
    /// Index of the reactor serving the queue.
    pub reactor: usize,
    pub counters: QueueCounters,
    /// Kick seen by the reactor (or the pop, for requests found by polling) to used-ring publish, ns.
    pub kick_to_complete: Histogram<u64>,
    /// Pop from the avail ring to completion, ns.
    pub service: Histogram<u64>,
    /// Requests popped per pass.
    pub batch: Histogram<u64>,
    /// [`kick_to_complete`](Self::kick_to_complete) in fixed buckets, kept by
    /// [`merge`](Self::merge) only (a cumulative report's entries); the reactor records into
    /// the histograms alone, so readers check [`Buckets::total`] against the histogram.
    pub k2c_buckets: Buckets,
    /// [`service`](Self::service) in fixed buckets, kept like `k2c_buckets`.
    pub service_buckets: Buckets,
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, SIGFIGS)
        .expect("constant histogram bounds are valid")
}

impl QueueMetrics {
    /// Allocates all histograms up front; recording never allocates afterwards.
    pub fn new(device: &str, queue: u16, reactor: usize) -> Self {
        QueueMetrics {
            device: device.to_string(),
            queue,
            reactor,
            counters: QueueCounters::default(),
            kick_to_complete: latency_histogram(),
            service: latency_histogram(),
            batch: Histogram::new_with_bounds(1, BATCH_MAX, SIGFIGS)
                .expect("constant histogram bounds are valid"),
            k2c_buckets: Buckets::default(),
            service_buckets: Buckets::default(),
        }
    }

    fn key(&self) -> (&str, u16) {
        (&self.device, self.queue)
    }

    /// The metrics of what `rec` recorded (a copy: `rec` keeps its samples).
    #[cfg(test)]
    pub(crate) fn of(rec: &QueueRecorder) -> QueueMetrics {
        let mut m = QueueMetrics::new(&rec.device, rec.queue, rec.reactor);
        m.absorb(&mut rec.clone());
        m
    }

    /// Drains `rec` (what this queue recorded over an interval) into `self`: counters,
    /// histograms and fixed buckets, touching only the recorders' written blocks. Leaves
    /// `rec` empty, with its memory, for the next interval.
    pub fn absorb(&mut self, rec: &mut QueueRecorder) {
        self.counters.add(&rec.counters);
        rec.counters = QueueCounters::default();
        rec.kick_to_complete
            .drain_into(&mut self.kick_to_complete, Some(&mut self.k2c_buckets));
        rec.service
            .drain_into(&mut self.service, Some(&mut self.service_buckets));
        rec.batch.drain_into(&mut self.batch, None);
    }

    /// Adds `o` into `self` (same device and queue), and `o`'s latency samples into
    /// `self`'s fixed buckets (from `o`'s histograms: an interval's span only).
    pub fn merge(&mut self, o: &QueueMetrics) {
        self.counters.add(&o.counters);
        self.k2c_buckets.add(&o.kick_to_complete);
        self.service_buckets.add(&o.service);
        buckets::add_range(&mut self.kick_to_complete, &o.kick_to_complete);
        buckets::add_range(&mut self.service, &o.service);
        // Same bounds on both sides, so `add` cannot fail (4,096 counters: cheap).
        let _ = self.batch.add(&o.batch);
    }
}

/// What a reactor records for one queue between two snapshots: the live side of a
/// [`QueueMetrics`]. Plain integers and [`Recorder`]s: only the owning reactor writes them.
#[derive(Debug, Clone)]
pub struct QueueRecorder {
    /// Device name (`blk0` or the disk's `id=`).
    pub device: String,
    pub queue: u16,
    /// Index of the reactor serving the queue.
    pub reactor: usize,
    pub counters: QueueCounters,
    /// Kick seen by the reactor (or the pop, for requests found by polling) to used-ring publish, ns.
    pub kick_to_complete: Recorder,
    /// Pop from the avail ring to completion, ns.
    pub service: Recorder,
    /// Requests popped per pass.
    pub batch: Recorder,
}

impl QueueRecorder {
    /// Allocates all recorders up front; recording never allocates afterwards.
    pub fn new(device: &str, queue: u16, reactor: usize) -> Self {
        QueueRecorder {
            device: device.to_string(),
            queue,
            reactor,
            counters: QueueCounters::default(),
            kick_to_complete: Recorder::new(LATENCY_MAX_NS),
            service: Recorder::new(LATENCY_MAX_NS),
            batch: Recorder::new(BATCH_MAX),
        }
    }

    /// Records a kick-to-completion latency.
    #[inline]
    pub fn record_k2c(&mut self, d: Duration) {
        let ns = clamp_ns(d);
        self.kick_to_complete.record(ns);
        self.counters.k2c_sum_ns = self.counters.k2c_sum_ns.wrapping_add(ns);
    }

    /// Records a service time.
    #[inline]
    pub fn record_service(&mut self, d: Duration) {
        let ns = clamp_ns(d);
        self.service.record(ns);
        self.counters.service_sum_ns = self.counters.service_sum_ns.wrapping_add(ns);
    }

    /// Records the size of a batch (zero-sized batches are not recorded).
    #[inline]
    pub fn record_batch(&mut self, n: usize) {
        if n > 0 {
            self.batch.record(n as u64);
        }
    }

    /// Stand-in for a queue's recorder once it was moved out (recorders without counters:
    /// a queue being retired records nothing more).
    pub(crate) fn placeholder() -> Self {
        QueueRecorder {
            device: String::new(),
            queue: 0,
            reactor: 0,
            counters: QueueCounters::default(),
            kick_to_complete: Recorder::none(),
            service: Recorder::none(),
            batch: Recorder::none(),
        }
    }

    /// Takes what `live` recorded since its previous take, without copying or allocating:
    /// `self` (empty, as [`QueueMetrics::absorb`] leaves it) swaps its recorders with
    /// `live`'s, gets the counters counted since `reported`, and `reported` moves on to
    /// `live`'s counters. The name is copied into the capacity `self` already has (no
    /// allocation once it held a name as long).
    pub fn take_interval(&mut self, live: &mut QueueRecorder, reported: &mut QueueCounters) {
        debug_assert!(
            self.kick_to_complete.is_empty() && self.service.is_empty() && self.batch.is_empty()
        );
        self.device.clone_from(&live.device);
        self.queue = live.queue;
        self.reactor = live.reactor;
        self.counters = live.counters.since(reported);
        reported.clone_from(&live.counters);
        std::mem::swap(&mut self.kick_to_complete, &mut live.kick_to_complete);
        std::mem::swap(&mut self.service, &mut live.service);
        std::mem::swap(&mut self.batch, &mut live.batch);
    }

    /// Adds `o` (the same device and queue) into `self`.
    pub fn merge(&mut self, o: &QueueRecorder) {
        self.counters.add(&o.counters);
        self.kick_to_complete.add(&o.kick_to_complete);
        self.service.add(&o.service);
        self.batch.add(&o.batch);
    }
}

#[inline]
fn clamp_ns(d: Duration) -> u64 {
    (d.as_nanos().min(LATENCY_MAX_NS as u128) as u64).max(1)
}

/// Time accounting of one reactor thread.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReactorMetrics {
    pub index: usize,
    /// Core the reactor is pinned to.
    pub core: usize,
    /// Time spent outside the blocking wait for completions, ns.
    pub busy_ns: u64,
    /// Time spent blocked in `io_uring_enter` waiting for work, ns.
    pub idle_ns: u64,
    /// Loop iterations.
    pub passes: u64,
    /// `io_uring_enter` calls.
    pub enters: u64,
}

/// A point-in-time copy of all metrics of a reactor pool.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub reactors: Vec<ReactorMetrics>,
    /// One entry per (device, queue), sorted by device name then queue index.
    pub queues: Vec<QueueMetrics>,
    /// Wall time covered by the report (pool start to snapshot).
    pub elapsed: Duration,
}

impl Report {
    /// Merges `other` into `self`: reactors are appended, queues with the same device and
    /// queue index (a queue re-attached after a reset) are summed.
    pub fn merge(&mut self, other: Report) {
        self.reactors.extend(other.reactors);
        for q in other.queues {
            self.add_queue(&q);
        }
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    /// Adds one queue's metrics, summing with an existing entry for the same device and queue.
    pub fn add_queue(&mut self, q: &QueueMetrics) {
        self.entry(&q.device, q.queue, q.reactor).merge(q);
    }

    /// Drains `q` (what one queue recorded over an interval) into the entry of the same
    /// device and queue, without allocating when that entry exists; otherwise into a new
    /// one. Leaves `q` empty.
    pub fn add_recorded(&mut self, q: &mut QueueRecorder) {
        self.entry(&q.device, q.queue, q.reactor).absorb(q);
    }

    /// The entry of `device`'s queue `queue`, added (in order) if missing.
    fn entry(&mut self, device: &str, queue: u16, reactor: usize) -> &mut QueueMetrics {
        let key = (device, queue);
        let i = match self.queues.iter().position(|e| e.key() == key) {
            Some(i) => i,
            None => {
                let i = self.queues.partition_point(|e| e.key() < key);
                self.queues
                    .insert(i, QueueMetrics::new(device, queue, reactor));
                i
            }
        };
        &mut self.queues[i]
    }

    /// Total requests over all queues.
    pub fn total_requests(&self) -> u64 {
        self.queues.iter().map(|q| q.counters.requests()).sum()
    }

    /// Reactor busy time per completed request, ns (0 when no request completed).
    pub fn busy_ns_per_request(&self) -> u64 {
        let busy: u64 = self.reactors.iter().map(|r| r.busy_ns).sum();
        busy.checked_div(self.total_requests()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_record_over_range_saturates_not_panics() {
        let mut rec = QueueRecorder::new("blk0", 0, 0);
        rec.record_k2c(Duration::from_secs(3600));
        rec.record_batch(1_000_000);
        rec.record_service(Duration::ZERO);
        let m = QueueMetrics::of(&rec);
        assert_eq!(m.kick_to_complete.len(), 1);
        assert_eq!(
            m.kick_to_complete.max(),
            m.kick_to_complete.highest_equivalent(LATENCY_MAX_NS)
        );
        assert_eq!(m.batch.len(), 1);
        assert_eq!(m.service.min(), 1);
    }

    #[test]
    fn test_merge_same_queue_sums_counters_and_histograms() {
        let mut rec = QueueRecorder::new("blk0", 1, 0);
        rec.record_service(Duration::from_micros(10));
        let mut a = QueueMetrics::of(&rec);
        a.counters.reads = 2;
        let mut b = a.clone();
        b.counters.reads = 3;
        let mut r = Report::default();
        r.add_queue(&a);
        r.add_queue(&b);
        r.add_queue(&QueueMetrics::new("blk0", 0, 0));
        assert_eq!(r.queues.len(), 2);
        assert_eq!(r.queues[0].queue, 0);
        assert_eq!(r.queues[1].counters.reads, 5);
        assert_eq!(r.queues[1].service.len(), 2);
        assert_eq!(r.queues[1].service_buckets.total(), 2);
    }

    #[test]
    fn test_add_recorded_drains_into_the_entry_and_leaves_the_recorder_empty() {
        let mut r = Report::default();
        let mut rec = QueueRecorder::new("blk1", 2, 0);
        for (i, us) in [3u64, 4, 900].into_iter().enumerate() {
            rec.counters.reads += 1;
            rec.record_k2c(Duration::from_micros(us));
            rec.record_service(Duration::from_micros(us));
            rec.record_batch(i + 1);
            r.add_recorded(&mut rec);
            assert!(rec.kick_to_complete.is_empty() && rec.service.is_empty());
            assert!(rec.batch.is_empty() && rec.counters == QueueCounters::default());
        }
        let mut other = QueueRecorder::new("blk0", 0, 0);
        other.record_k2c(Duration::from_micros(1));
        r.add_recorded(&mut other);
        assert_eq!(r.queues.len(), 2);
        let q = &r.queues[1];
        assert_eq!((q.device.as_str(), q.queue), ("blk1", 2));
        assert_eq!(q.counters.reads, 3);
        assert_eq!(q.counters.k2c_sum_ns, 907_000);
        assert_eq!((q.kick_to_complete.len(), q.batch.len()), (3, 3));
        assert_eq!(
            q.kick_to_complete.max(),
            q.kick_to_complete.highest_equivalent(900_000)
        );
        assert_eq!(q.k2c_buckets, Buckets::of(&q.kick_to_complete));
        assert_eq!(
            q.service_buckets.cumulative()[2],
            2,
            "3 and 4 µs are at most 5 µs"
        );
    }
}
