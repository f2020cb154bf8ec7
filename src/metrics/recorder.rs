//! The reactors' side of a histogram: what a queue records into between two snapshots.
//!
//! A [`Recorder`] has HdrHistogram's layout exactly (the counters of
//! `Histogram::new_with_bounds(1, high, 3)`, index for index) plus one bit per block of 64
//! counters that says the block was written. Handing an interval to the cumulative report
//! ([`Recorder::drain_into`]) and emptying it for reuse then cost in proportion to what was
//! recorded: a queue at a steady latency touches a handful of blocks between two scrapes,
//! while `Histogram::reset` writes all 25,600 counters (200 KiB) and `Histogram::add` reads
//! them all. Those walks were a third of the API thread's time per `/metrics` scrape and
//! pushed the vCPU's or reactor's working set out of the core's cache (perf/RESULTS.md,
//! "Control plane").
//!
//! Recording is a leading-zero count, two shifts, an add and one OR into a bitmap word that
//! stays in cache: 2.9 ns a sample against 3.6 ns for `Histogram::saturating_record`
//! (`cargo bench --bench blk -- histogram/record`, perf/RESULTS.md).

use std::ops::Range;

use hdrhistogram::Histogram;

use super::buckets::Buckets;
use super::SIGFIGS;

/// `log2` of half the sub-buckets per bucket at 3 significant figures (HdrHistogram's
/// `sub_bucket_half_count_magnitude`: 2 × 10³ rounded up to 2048 sub-buckets).
const HALF_MAGNITUDE: u32 = 10;
const HALF_COUNT: usize = 1 << HALF_MAGNITUDE;
/// Values below this share bucket 0 (`sub_bucket_mask`).
const SUB_BUCKET_MASK: u64 = (2 << HALF_MAGNITUDE) - 1;
/// `64 - unit_magnitude (0, for a lowest value of 1) - sub_bucket_count_magnitude (11)`.
const LEADING_ZERO_BASE: u32 = 64 - (HALF_MAGNITUDE + 1);
/// Counters per touched bit.
const BLOCK: usize = 64;

/// Samples recorded since the last drain, in HdrHistogram's layout for values 1 to `high`
/// at 3 significant figures. Values above `high` are recorded as `high`.
#[derive(Debug, Clone)]
pub struct Recorder {
    counts: Box<[u64]>,
    /// Bit `i` of word `w`: block `64 * w + i` (counters `BLOCK` times that onwards) may
    /// hold a non-zero count.
    touched: Box<[u64]>,
    total: u64,
    high: u64,
}

/// The bucket (power-of-two range) of `v`.
#[inline]
fn bucket_of(v: u64) -> u32 {
    LEADING_ZERO_BASE - (v | SUB_BUCKET_MASK).leading_zeros()
}

/// HdrHistogram's counter index of `v`.
#[inline]
fn index_of(v: u64) -> usize {
    let b = bucket_of(v);
    (((b + 1) as usize) << HALF_MAGNITUDE) + (v >> b) as usize - HALF_COUNT
}

/// The counter ranges of the blocks whose bits are set in `touched`, in increasing order
/// (`len`: the number of counters).
fn touched_blocks(touched: &[u64], len: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    touched.iter().enumerate().flat_map(move |(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let start = (w * 64 + bits.trailing_zeros() as usize) * BLOCK;
                bits &= bits - 1;
                start..(start + BLOCK).min(len)
            })
        })
    })
}

/// The lowest value counted at `index`, and the width of its range.
fn value_at(index: usize) -> (u64, u64) {
    let bucket = (index >> HALF_MAGNITUDE) as i64 - 1;
    let sub = ((index & (HALF_COUNT - 1)) + HALF_COUNT) as u64;
    if bucket < 0 {
        (sub - HALF_COUNT as u64, 1)
    } else {
        (sub << bucket, 1 << bucket)
    }
}

impl Recorder {
    /// An empty recorder for values 1 to `high`; allocates its counters once.
    pub fn new(high: u64) -> Recorder {
        debug_assert_eq!(
            SIGFIGS, 3,
            "the layout constants are for 3 significant figures"
        );
        let high = high.max(SUB_BUCKET_MASK + 1);
        let len = index_of(high) / HALF_COUNT * HALF_COUNT + HALF_COUNT;
        let blocks = len.div_ceil(BLOCK);
        Recorder {
            counts: vec![0; len].into_boxed_slice(),
            touched: vec![0; blocks.div_ceil(64)].into_boxed_slice(),
            total: 0,
            high,
        }
    }

    /// A recorder that keeps nothing (no memory): a stand-in for one moved out.
    pub fn none() -> Recorder {
        Recorder {
            counts: Box::default(),
            touched: Box::default(),
            total: 0,
            high: 0,
        }
    }

    /// Records one sample.
    #[inline]
    pub fn record(&mut self, v: u64) {
        // In range: `v` is at most `high`, whose index is below `counts.len()`.
        self.add_at(index_of(v.min(self.high)), 1);
    }

    /// Samples recorded since the last drain.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True when nothing was recorded since the last drain.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Calls `f(lowest value, width, count)` for every non-zero counter, in increasing
    /// order, visiting touched blocks only.
    fn visit(&self, mut f: impl FnMut(u64, u64, u64)) {
        for block in touched_blocks(&self.touched, self.counts.len()) {
            for (i, &c) in self.counts[block.clone()].iter().enumerate() {
                if c != 0 {
                    let (v, width) = value_at(block.start + i);
                    f(v, width, c);
                }
            }
        }
    }

    /// Empties the recorder, zeroing the touched blocks only.
    pub fn clear(&mut self) {
        for block in touched_blocks(&self.touched, self.counts.len()) {
            self.counts[block].fill(0);
        }
        self.touched.fill(0);
        self.total = 0;
    }

    /// Adds `n` samples at counter `i`.
    #[inline]
    fn add_at(&mut self, i: usize, n: u64) {
        if let Some(c) = self.counts.get_mut(i) {
            *c = c.saturating_add(n);
            self.touched[i / (BLOCK * 64)] |= 1 << (i / BLOCK % 64);
            self.total = self.total.saturating_add(n);
        }
    }

    /// Adds every sample into `into` (and, if given, into the fixed `buckets`) and leaves
    /// the recorder empty, touching only the blocks that were written. `into` should have
    /// the same bounds (it does for the metrics' histograms); a sample it cannot hold is
    /// clamped to its highest value.
    pub fn drain_into(&mut self, into: &mut Histogram<u64>, mut buckets: Option<&mut Buckets>) {
        if self.total == 0 {
            return;
        }
        self.visit(|v, width, c| {
            into.saturating_record_n(v.min(into.high()), c);
            if let Some(b) = buckets.as_deref_mut() {
                b.add_count(v + width - 1, c);
            }
        });
        self.clear();
    }

    /// Adds `other`'s samples into `self` (values above `self`'s highest are clamped to it).
    pub fn add(&mut self, other: &Recorder) {
        other.visit(|v, _, c| self.add_at(index_of(v.min(self.high)), c));
    }

    /// The samples as an HdrHistogram of the same bounds (for copies that leave the reactor
    /// whole: a stop's report, an inline reactor's).
    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, self.high, SIGFIGS)
            .expect("recorder bounds are valid histogram bounds");
        self.visit(|v, _, c| h.saturating_record_n(v, c));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{BATCH_MAX, LATENCY_MAX_NS};

    fn values() -> Vec<u64> {
        let mut v: Vec<u64> = vec![0, 1, 2, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 4097];
        v.extend((0..4000u64).map(|i| 3_000 + (i * 7919) % 40_000));
        v.extend([
            999_999,
            1_000_000,
            123_456_789,
            LATENCY_MAX_NS - 1,
            LATENCY_MAX_NS,
        ]);
        for s in 0..40 {
            v.push((1u64 << s) - 1);
            v.push(1u64 << s);
        }
        v.retain(|&x| x <= LATENCY_MAX_NS);
        v
    }

    #[test]
    fn test_layout_is_hdrhistograms() {
        for high in [LATENCY_MAX_NS, BATCH_MAX] {
            let h = Histogram::<u64>::new_with_bounds(1, high, SIGFIGS).unwrap();
            let r = Recorder::new(high);
            assert_eq!(r.counts.len(), h.distinct_values(), "high {high}");
            for v in values().into_iter().filter(|&v| v <= high) {
                let (low, width) = value_at(index_of(v));
                assert_eq!(low, h.lowest_equivalent(v), "lowest of {v}");
                assert_eq!(low + width - 1, h.highest_equivalent(v), "highest of {v}");
            }
        }
    }

    #[test]
    fn test_drain_equals_recording_into_hdrhistogram_and_empties() {
        let mut want = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_NS, SIGFIGS).unwrap();
        let mut r = Recorder::new(LATENCY_MAX_NS);
        for v in values() {
            want.record(v).unwrap();
            r.record(v);
        }
        r.record(LATENCY_MAX_NS * 3);
        want.record(LATENCY_MAX_NS).unwrap();
        assert_eq!(r.len(), want.len());
        assert_eq!(r.to_histogram(), want);
        let mut got = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_NS, SIGFIGS).unwrap();
        let mut buckets = Buckets::default();
        r.drain_into(&mut got, Some(&mut buckets));
        assert_eq!(got, want);
        assert_eq!(
            (got.min(), got.max(), got.len()),
            (want.min(), want.max(), want.len())
        );
        assert_eq!(buckets, Buckets::of(&want));
        assert!(r.is_empty());
        assert!(r.counts.iter().all(|&c| c == 0) && r.touched.iter().all(|&w| w == 0));
        // Drained twice: nothing more.
        r.drain_into(&mut got, None);
        assert_eq!(got.len(), want.len());
    }

    #[test]
    fn test_add_sums_and_keeps_the_source() {
        let (mut a, mut b) = (Recorder::new(BATCH_MAX), Recorder::new(BATCH_MAX));
        for v in [1, 5, 5, 4096, 9999] {
            a.record(v);
        }
        for v in [5, 300] {
            b.record(v);
        }
        a.add(&b);
        assert_eq!((a.len(), b.len()), (7, 2));
        let h = a.to_histogram();
        assert_eq!(h.count_at(5), 3);
        assert_eq!(h.count_at(BATCH_MAX), 2);
        assert_eq!(h.count_at(300), 1);
    }
}
