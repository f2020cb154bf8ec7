//! Crash-durability bookkeeping for `durable=1` (writer) and `verify_only=1` (checker).
//!
//! The writer (randwrite, verify=1, flush_every=N) puts write generation `g` on block
//! [`block_of`]`(seed, g)`, a pure function, so a later boot can recompute which block
//! every generation went to without any state from the writer. A write that would land
//! on a block with a request in flight waits (the block choice never changes), so the
//! mapping holds whatever the timing.
//!
//! When it submits a FLUSH, the writer notes the *watermark*: the largest `G` such that
//! every generation `1..=G` has completed (seen in the used ring). The device has to make
//! all of them durable before it completes the flush (virtio 1.2, 5.2.6: a flush covers
//! the writes completed before it was submitted). After the flush completes, the writer
//! prints `durable: flushed <seq> gen <G>` on the console, so a host that kills the VMM
//! knows the newest `G` that was promised.
//!
//! The checker boots on the same disk with `seed`, `run` (the writer's run id) and
//! `upto=G`, recomputes for every block the last generation `<= G` that went there
//! ([`expected_last`]), reads every sector and requires an intact stamp of that run with
//! a generation at least that high (a later write of the same block may have landed,
//! whole or torn, but never an older one). What it cannot check: writes after `G`
//! (never promised) and blocks no write `<= G` touched (any intact content is fine).

/// The block generation `gen` of a `seed` run goes to, in `0..blocks`.
pub fn block_of(seed: u64, gen: u64, blocks: u64) -> u64 {
    let mut z = seed.rotate_left(17) ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((u128::from(z) * u128::from(blocks)) >> 64) as u64
}

/// Fills `table[b]` with the last generation `<= upto` written to block `b` (0: none).
/// Returns how many blocks have one (the writes the checker can verify directly).
pub fn expected_last(seed: u64, upto: u64, table: &mut [u32]) -> u64 {
    table.fill(0);
    let blocks = table.len() as u64;
    let mut covered = 0;
    for g in 1..=upto {
        let e = &mut table[block_of(seed, g, blocks) as usize];
        if *e == 0 {
            covered += 1;
        }
        *e = g as u32;
    }
    covered
}

/// What one sector of a checked block says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Holds the expected generation or a newer one of the writer's run, or (no write
    /// promised) anything intact.
    Fine,
    /// A write promised by a completed flush is missing: zeros, another run's stamp or
    /// an older generation.
    Lost,
    /// A stamp of the writer's run whose generation does not belong to this block.
    Misplaced,
}

/// Judges one intact sector (`found` = `None` for zeros, else `(run, gen)`) of `block`,
/// whose last promised generation is `expect` (0 = none).
pub fn judge(found: Option<(u64, u64)>, block: u64, expect: u32, seed: u64, run: u64, blocks: u64) -> Verdict {
    match found {
        Some((r, g)) if r == run => {
            if block_of(seed, g, blocks) != block {
                Verdict::Misplaced
            } else if g < u64::from(expect) {
                Verdict::Lost
            } else {
                Verdict::Fine
            }
        }
        _ if expect != 0 => Verdict::Lost,
        _ => Verdict::Fine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_block_of_spreads_and_stays_in_range() {
        let mut hit = [0u32; 64];
        for g in 1..=6400 {
            let b = block_of(7, g, 64);
            hit[b as usize] += 1;
        }
        assert!(hit.iter().all(|&n| n > 50 && n < 150), "{hit:?}");
        assert_ne!(block_of(7, 1, 1 << 20), block_of(8, 1, 1 << 20));
    }

    #[test]
    fn test_expected_last_keeps_the_newest_generation_per_block() {
        let mut t = [0u32; 8];
        let covered = expected_last(3, 100, &mut t);
        assert_eq!(covered, t.iter().filter(|&&g| g != 0).count() as u64);
        for (b, &g) in t.iter().enumerate() {
            if g != 0 {
                assert_eq!(block_of(3, u64::from(g), 8), b as u64);
                assert!(((u64::from(g) + 1)..=100).all(|h| block_of(3, h, 8) != b as u64));
            }
        }
        assert_eq!(expected_last(3, 0, &mut t), 0);
        assert!(t.iter().all(|&g| g == 0));
    }

    #[test]
    fn test_judge_older_generation_or_zeros_is_lost() {
        let (seed, run, blocks) = (5, 0x77, 16);
        let g = (1..).find(|&g| block_of(seed, g, blocks) == 3).unwrap();
        let later = (g + 1..).find(|&h| block_of(seed, h, blocks) == 3).unwrap();
        assert_eq!(judge(Some((run, g)), 3, g as u32, seed, run, blocks), Verdict::Fine);
        assert_eq!(judge(Some((run, later)), 3, g as u32, seed, run, blocks), Verdict::Fine);
        assert_eq!(judge(Some((run, g)), 3, later as u32, seed, run, blocks), Verdict::Lost);
        assert_eq!(judge(None, 3, g as u32, seed, run, blocks), Verdict::Lost);
        assert_eq!(judge(Some((run + 2, g)), 3, g as u32, seed, run, blocks), Verdict::Lost);
        assert_eq!(judge(None, 3, 0, seed, run, blocks), Verdict::Fine);
        assert_eq!(judge(Some((run, g)), 4, 0, seed, run, blocks), Verdict::Misplaced);
    }
}
