//! Log-linear latency histogram (HdrHistogram layout, 2 significant digits):
//! 128 linear sub-buckets per power of two, so a bucket is at most 1/128
//! (< 1 %) of its value wide. Values are nanoseconds, 1 ns to ~550 s;
//! larger values are clamped. Fixed size, no allocation.

/// log2 of half the sub-bucket count (256 sub-buckets for 2 significant digits).
const SUB_HALF_MAG: u32 = 7;
const SUB_HALF: u64 = 1 << SUB_HALF_MAG;
const SUB_MASK: u64 = 2 * SUB_HALF - 1;
/// Power-of-two buckets: covers values below 256 << 31 ns (~550 s).
const BUCKETS: usize = 32;
/// Number of counters.
pub const COUNTS: usize = (BUCKETS + 1) * SUB_HALF as usize;
/// Largest recordable value.
pub const MAX_VALUE: u64 = (2 * SUB_HALF << (BUCKETS - 1)) - 1;

pub struct Histogram {
    counts: [u64; COUNTS],
    pub total: u64,
    pub min: u64,
    pub max: u64,
    pub sum: u128,
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram { counts: [0; COUNTS], total: 0, min: u64::MAX, max: 0, sum: 0 }
    }

    pub fn clear(&mut self) {
        *self = Histogram::new();
    }

    #[inline(always)]
    fn index(v: u64) -> usize {
        let bucket = (64 - SUB_HALF_MAG - 1) - (v | SUB_MASK).leading_zeros();
        let sub = v >> bucket;
        // Bucket 0 also holds sub-bucket indices below SUB_HALF: add before subtracting.
        ((((bucket + 1) as u64) << SUB_HALF_MAG) + sub - SUB_HALF) as usize
    }

    /// Lowest value that lands in counter `i`.
    pub fn value_at(i: usize) -> u64 {
        let mut bucket = (i >> SUB_HALF_MAG) as i32 - 1;
        let mut sub = (i as u64 & (SUB_HALF - 1)) + SUB_HALF;
        if bucket < 0 {
            sub -= SUB_HALF;
            bucket = 0;
        }
        sub << bucket
    }

    /// Highest value that lands in counter `i`.
    pub fn highest_at(i: usize) -> u64 {
        let bucket = ((i >> SUB_HALF_MAG) as i32 - 1).max(0);
        Self::value_at(i) + (1u64 << bucket) - 1
    }

    #[inline(always)]
    pub fn record(&mut self, v: u64) {
        let v = v.min(MAX_VALUE);
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn mean(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            (self.sum / u128::from(self.total)) as u64
        }
    }

    /// Value at percentile `p_milli` (per-hundred-thousand, e.g. 99_900 = p99.9):
    /// the highest value equivalent to the bucket holding that rank, capped at max.
    pub fn percentile(&self, p_per_100k: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((u128::from(self.total) * u128::from(p_per_100k) + 99_999) / 100_000).max(1) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::highest_at(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Non-empty buckets as (lowest value, count).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts.iter().enumerate().filter(|(_, &c)| c != 0).map(|(i, &c)| (Self::value_at(i), c))
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_index_of_bucket_low_value_is_that_bucket() {
        for i in 0..COUNTS - 1 {
            assert_eq!(Histogram::index(Histogram::value_at(i)), i, "index {i}");
            assert_eq!(Histogram::index(Histogram::highest_at(i)), i, "index {i}");
        }
    }

    #[test]
    fn test_record_any_value_bucket_error_below_one_percent() {
        let mut v = 1u64;
        while v < MAX_VALUE {
            let i = Histogram::index(v);
            let (lo, hi) = (Histogram::value_at(i), Histogram::highest_at(i));
            assert!(lo <= v && v <= hi, "{v} not in [{lo}, {hi}]");
            assert!((hi - lo) as f64 <= v as f64 / 128.0, "bucket of {v} too wide");
            v = v * 9 / 8 + 1;
        }
    }

    #[test]
    fn test_percentiles_uniform_values_within_one_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        assert_eq!(h.total, 100_000);
        assert_eq!(h.min, 10);
        assert_eq!(h.max, 1_000_000);
        assert_eq!(h.mean(), 500_005);
        for (p, want) in [(50_000, 500_000f64), (99_000, 990_000.0), (99_900, 999_000.0)] {
            let got = h.percentile(p) as f64;
            assert!((got - want).abs() / want < 0.01, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.percentile(100_000), 1_000_000);
        assert_eq!(h.buckets().map(|(_, c)| c).sum::<u64>(), 100_000);
    }

    #[test]
    fn test_record_huge_value_clamped_to_max() {
        let mut h = Histogram::new();
        h.record(u64::MAX);
        assert_eq!(h.max, MAX_VALUE);
        assert_eq!(h.percentile(50_000), MAX_VALUE);
    }

    #[test]
    fn test_empty_histogram_reports_zero() {
        let h = Histogram::new();
        assert_eq!(h.percentile(99_000), 0);
        assert_eq!(h.mean(), 0);
        assert_eq!(h.buckets().count(), 0);
    }
}
