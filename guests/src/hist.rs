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
        (((bucket + 1) as u64) << SUB_HALF_MAG) as usize + (sub - SUB_HALF) as usize
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
