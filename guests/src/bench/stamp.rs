//! verify=1 sector stamps. Every 512-byte sector a write carries says which
//! LBA it belongs to, which run and write generation produced it, and a
//! checksum over all of it, so a read can be judged from the data alone —
//! also in a later run that only reads:
//!
//! | bytes   | field                                        |
//! |---------|----------------------------------------------|
//! | 0..4    | magic `RVB1` (0x31425652 little endian)       |
//! | 4..8    | checksum of bytes 8..512                     |
//! | 8..16   | LBA (512-byte sector number)                 |
//! | 16..24  | run id (TSC at start of the writing run)     |
//! | 24..32  | generation (per-run write counter, from 1)   |
//! | 32..512 | pseudo-random fill derived from the above    |
//!
//! A sector of all zeros was never written and is accepted.

use crate::arch::mmio;

pub const MAGIC: u32 = 0x3142_5652;
const SECTOR: u64 = 512;
const WORDS: u64 = SECTOR / 8;

/// What a read is allowed to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Written in this run with this generation (completed before the read was issued).
    Gen(u64),
    /// Not written by this run: zeros or any intact stamp from another run.
    NotThisRun,
    /// Unknown (a failed write, or no per-block table): any intact stamp or zeros.
    Any,
}

/// Why a sector failed.
#[derive(Clone, Copy, Debug)]
pub enum Mismatch {
    BadMagic,
    BadChecksum,
    WrongLba(u64),
    WrongRun(u64),
    WrongGen(u64),
}

#[inline(always)]
fn word(addr: u64, i: u64) -> u64 {
    // SAFETY: callers pass a sector inside a data buffer this driver owns (8-byte aligned).
    unsafe { core::ptr::read_volatile((addr + 8 * i) as *const u64) }
}

#[inline(always)]
fn set_word(addr: u64, i: u64, v: u64) {
    // SAFETY: as for `word`.
    unsafe { core::ptr::write_volatile((addr + 8 * i) as *mut u64, v) }
}

fn checksum(addr: u64) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 1..WORDS {
        h = (h ^ word(addr, i)).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    (h ^ (h >> 32)) as u32
}

/// Stamps `bytes / 512` sectors at `buf` starting at `lba`.
pub fn fill(buf: u64, bytes: u64, lba: u64, run: u64, gen: u64) {
    for s in 0..bytes / SECTOR {
        let at = buf + s * SECTOR;
        let l = lba + s;
        set_word(at, 1, l);
        set_word(at, 2, run);
        set_word(at, 3, gen);
        let mut x = l ^ gen.rotate_left(32) ^ run ^ 0x9e37_79b9_7f4a_7c15;
        for i in 4..WORDS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            set_word(at, i, x);
        }
        let sum = checksum(at);
        set_word(at, 0, u64::from(MAGIC) | (u64::from(sum) << 32));
    }
}

/// Checks `bytes / 512` sectors read from `lba`; returns the first bad one.
pub fn check(buf: u64, bytes: u64, lba: u64, run: u64, expect: Expect) -> Result<(), (u64, Mismatch)> {
    for s in 0..bytes / SECTOR {
        let at = buf + s * SECTOR;
        let l = lba + s;
        let head = word(at, 0);
        if head == 0 && (1..WORDS).all(|i| word(at, i) == 0) {
            if let Expect::Gen(_) = expect {
                return Err((l, Mismatch::WrongGen(0)));
            }
            continue;
        }
        if mmio::read32(at) != MAGIC {
            return Err((l, Mismatch::BadMagic));
        }
        if (head >> 32) as u32 != checksum(at) {
            return Err((l, Mismatch::BadChecksum));
        }
        if word(at, 1) != l {
            return Err((l, Mismatch::WrongLba(word(at, 1))));
        }
        let (r, g) = (word(at, 2), word(at, 3));
        match expect {
            Expect::Gen(_) if r != run => return Err((l, Mismatch::WrongRun(r))),
            Expect::Gen(want) if g != want => return Err((l, Mismatch::WrongGen(g))),
            Expect::NotThisRun if r == run => return Err((l, Mismatch::WrongRun(r))),
            _ => {}
        }
    }
    Ok(())
}

/// Reads one sector's stamp without expectations (a disk this boot did not write):
/// `Ok(None)` for all zeros, `Ok(Some((run, gen)))` for an intact stamp of `lba`.
pub fn inspect(at: u64, lba: u64) -> Result<Option<(u64, u64)>, Mismatch> {
    let head = word(at, 0);
    if head == 0 && (1..WORDS).all(|i| word(at, i) == 0) {
        return Ok(None);
    }
    if mmio::read32(at) != MAGIC {
        return Err(Mismatch::BadMagic);
    }
    if (head >> 32) as u32 != checksum(at) {
        return Err(Mismatch::BadChecksum);
    }
    if word(at, 1) != lba {
        return Err(Mismatch::WrongLba(word(at, 1)));
    }
    Ok(Some((word(at, 2), word(at, 3))))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    const RUN: u64 = 0x1234_5679;

    fn buf(sectors: usize) -> std::vec::Vec<u64> {
        vec![0u64; sectors * 64]
    }

    #[test]
    fn test_check_own_write_passes() {
        let b = buf(8);
        let at = b.as_ptr() as u64;
        fill(at, 4096, 800, RUN, 3);
        assert!(check(at, 4096, 800, RUN, Expect::Gen(3)).is_ok());
        assert!(check(at, 4096, 800, RUN, Expect::Any).is_ok());
        // A later run (different id) accepts it from the stamp alone.
        assert!(check(at, 4096, 800, RUN + 2, Expect::NotThisRun).is_ok());
    }

    #[test]
    fn test_check_zero_sectors_pass_unless_a_write_is_expected() {
        let b = buf(2);
        let at = b.as_ptr() as u64;
        assert!(check(at, 1024, 0, RUN, Expect::NotThisRun).is_ok());
        assert!(matches!(check(at, 1024, 0, RUN, Expect::Gen(1)), Err((0, Mismatch::WrongGen(0)))));
    }

    #[test]
    fn test_check_flipped_bit_fails_checksum() {
        let mut b = buf(2);
        let at = b.as_ptr() as u64;
        fill(at, 1024, 10, RUN, 1);
        b[64 + 40] ^= 1 << 7;
        assert!(matches!(check(at, 1024, 10, RUN, Expect::Any), Err((11, Mismatch::BadChecksum))));
    }

    #[test]
    fn test_check_misdirected_sector_fails_lba() {
        let b = buf(1);
        let at = b.as_ptr() as u64;
        fill(at, 512, 7, RUN, 1);
        assert!(matches!(check(at, 512, 8, RUN, Expect::Any), Err((8, Mismatch::WrongLba(7)))));
    }

    #[test]
    fn test_check_stale_generation_and_foreign_run_fail() {
        let b = buf(1);
        let at = b.as_ptr() as u64;
        fill(at, 512, 7, RUN, 1);
        assert!(matches!(check(at, 512, 7, RUN, Expect::Gen(2)), Err((7, Mismatch::WrongGen(1)))));
        assert!(matches!(check(at, 512, 7, RUN + 2, Expect::Gen(1)), Err((7, Mismatch::WrongRun(_)))));
        assert!(matches!(check(at, 512, 7, RUN, Expect::NotThisRun), Err((7, Mismatch::WrongRun(_)))));
    }

    #[test]
    fn test_inspect_reports_run_and_generation_or_zeros() {
        let mut b = buf(2);
        let at = b.as_ptr() as u64;
        fill(at, 512, 40, RUN, 9);
        assert_eq!(inspect(at, 40).unwrap(), Some((RUN, 9)));
        assert_eq!(inspect(at + 512, 41).unwrap(), None);
        assert!(matches!(inspect(at, 41), Err(Mismatch::WrongLba(40))));
        b[10] ^= 1;
        assert!(matches!(inspect(at, 40), Err(Mismatch::BadChecksum)));
    }

    #[test]
    fn test_check_garbage_fails_magic() {
        let mut b = buf(1);
        b[3] = 99;
        let at = b.as_ptr() as u64;
        assert!(matches!(check(at, 512, 0, RUN, Expect::Any), Err((0, Mismatch::BadMagic))));
    }
}
