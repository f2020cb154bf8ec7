//! Fixed latency buckets (Prometheus' `le` bounds) kept up to date from each interval, so a
//! `/metrics` scrape never walks the cumulative histograms.
//!
//! A cumulative HdrHistogram holds 25,600 counters per latency (1 ns to 10 s, 3 significant
//! digits); walking it for each scrape cost more than the rest of a scrape together (about
//! half of the API thread's time at 100 scrapes a second, perf/RESULTS.md "Control plane").
//! An interval holds a few blocks of samples instead (what one queue recorded in the last
//! few milliseconds), so the cumulative report adds each interval's per-bucket counts here
//! as it drains the reactors' recorders ([`super::Recorder::drain_into`], sample value by
//! sample value), or, merging two reports ([`super::QueueMetrics::merge`]), with
//! HdrHistogram's `count_between` over the other histogram's `[min, max]` only.
//!
//! A sample counts in the bucket `le` when its HdrHistogram bucket's highest equivalent
//! value is at most `le` (so a bound can be off by 0.1 % of its value), the same rule
//! whether the counts come from intervals or from a whole histogram ([`Buckets::of`]).

use hdrhistogram::Histogram;

/// Upper bounds of the latency buckets, ns (then `+Inf`): 1-2-5 steps from 1 µs to 1 s,
/// which covers a RAM disk at QD1 up to a saturated spinning disk.
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
];

/// Samples per bucket (not cumulative): entry `i` counts samples above bound `i - 1` up to
/// bound `i`; the last entry counts those above the last bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Buckets(pub [u64; LATENCY_BUCKETS_NS.len() + 1]);

impl Buckets {
    /// The buckets of every sample in `h`.
    pub fn of(h: &Histogram<u64>) -> Buckets {
        let mut b = Buckets::default();
        b.add(h);
        b
    }

    /// Adds every sample of `h`, touching only its `[min, max]` range.
    pub fn add(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        let (min, max) = (h.min(), h.max());
        // `from`: the lowest value not yet counted (always the start of an HdrHistogram bucket).
        let mut from = min;
        for (slot, &bound) in self.0.iter_mut().zip(LATENCY_BUCKETS_NS.iter()) {
            // The highest value whose HdrHistogram bucket lies wholly at or below `bound`.
            let top = if h.highest_equivalent(bound) == bound {
                bound
            } else {
                match h.lowest_equivalent(bound).checked_sub(1) {
                    Some(t) => t,
                    None => continue,
                }
            };
            if top < from {
                continue;
            }
            *slot += h.count_between(from, top.min(max));
            if top >= max {
                return;
            }
            from = top + 1;
        }
        self.0[LATENCY_BUCKETS_NS.len()] += h.count_between(from, max);
    }

    /// Adds `count` samples whose HdrHistogram bucket tops out at `top` (its highest
    /// equivalent value).
    #[inline]
    pub fn add_count(&mut self, top: u64, count: u64) {
        self.0[LATENCY_BUCKETS_NS.partition_point(|&b| b < top)] += count;
    }

    /// Samples counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Cumulative counts at each bound of [`LATENCY_BUCKETS_NS`] (the `+Inf` bucket is
    /// [`total`](Self::total)).
    pub fn cumulative(&self) -> [u64; LATENCY_BUCKETS_NS.len()] {
        let mut out = [0u64; LATENCY_BUCKETS_NS.len()];
        let mut acc = 0;
        for (o, p) in out.iter_mut().zip(self.0) {
            acc += p;
            *o = acc;
        }
        out
    }
}

/// Adds `src`'s samples into `dst` (same bounds and precision), reading only `src`'s
/// `[min, max]` range: empty stretches are skipped 64 sub-buckets at a time with
/// `count_between`, and only non-empty values are recorded. `Histogram::add` reads and
/// writes all 25,600 counters of both instead, which costs each scrape about as much cache
/// as the vCPU it shares a core with holds. Falls back to `add` when the histograms differ.
pub fn add_range(dst: &mut Histogram<u64>, src: &Histogram<u64>) {
    if src.is_empty() {
        return;
    }
    if dst.low() != src.low() || dst.high() != src.high() || dst.sigfig() != src.sigfig() {
        // Cannot fail for histograms of the same range once auto-resize is off.
        let _ = dst.add(src);
        return;
    }
    let max = src.max();
    let mut v = src.min();
    while v <= max {
        let step = src.next_non_equivalent(v) - v;
        let end = v.saturating_add(64 * step - 1).min(max);
        if src.count_between(v, end) != 0 {
            while v <= end {
                let c = src.count_at(v);
                if c != 0 {
                    dst.saturating_record_n(v, c);
                }
                v = src.next_non_equivalent(v);
            }
        } else {
            v = end + 1;
        }
        if end == max {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{LATENCY_MAX_NS, SIGFIGS};

    fn hist(values: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, LATENCY_MAX_NS, SIGFIGS).unwrap();
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    /// The rule, sample by sample: the first bound at or above the sample's bucket top.
    fn by_rule(h: &Histogram<u64>) -> Buckets {
        let mut b = Buckets::default();
        for v in h.iter_recorded() {
            let top = h.highest_equivalent(v.value_iterated_to());
            b.0[LATENCY_BUCKETS_NS.partition_point(|&x| x < top)] += v.count_at_value();
        }
        b
    }

    #[test]
    fn test_buckets_match_the_per_sample_rule_at_and_around_every_bound() {
        let mut values = vec![1, 7, 999, 3_000_000_000, LATENCY_MAX_NS];
        for &b in &LATENCY_BUCKETS_NS {
            values.extend([b - 1, b, b + 1, b + b / 500, b - b / 500]);
        }
        let h = hist(&values);
        let b = Buckets::of(&h);
        assert_eq!(b, by_rule(&h));
        assert_eq!(b.total(), values.len() as u64);
    }

    #[test]
    fn test_buckets_of_intervals_sum_to_buckets_of_the_whole() {
        let (a, c) = (hist(&[1_500, 40_000, 41_000]), hist(&[900, 6_000_000]));
        let mut b = Buckets::of(&a);
        b.add(&c);
        let mut whole = a.clone();
        whole.add(&c).unwrap();
        assert_eq!(b, Buckets::of(&whole));
        assert_eq!(b.cumulative()[0], 1, "only 900 ns is at most 1 µs");
        assert_eq!(b.cumulative()[LATENCY_BUCKETS_NS.len() - 1], 5);
    }

    #[test]
    fn test_add_range_equals_add() {
        let mut values: Vec<u64> = (0..5000u64).map(|i| 5_000 + (i * 7919) % 3_000).collect();
        values.extend([1, 999, 45_000, 3_000_000, LATENCY_MAX_NS]);
        for src in [hist(&values), hist(&[20_001]), hist(&[]), hist(&[0, 0, 7])] {
            let mut a = hist(&[40, 6_000, 7_000_000]);
            let mut b = a.clone();
            a.add(&src).unwrap();
            add_range(&mut b, &src);
            assert_eq!(a, b);
            assert_eq!((a.min(), a.max(), a.len()), (b.min(), b.max(), b.len()));
        }
    }

    #[test]
    fn test_buckets_of_a_narrow_range_count_every_sample_once() {
        let h = hist(&[20_001, 20_002, 20_050, 20_049]);
        let b = Buckets::of(&h);
        assert_eq!(b, by_rule(&h));
        assert_eq!(b.total(), 4);
        assert_eq!(Buckets::of(&hist(&[])).total(), 0);
    }
}
