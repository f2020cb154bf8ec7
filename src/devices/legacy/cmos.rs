//! A read-only MC146818 RTC/CMOS at ports 0x70/0x71: Linux reads the wall clock from it at
//! boot (and probes rtc_cmos); a guest cannot set the host's clock, so writes only select
//! the register.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::vmm::bus::BusDevice;

pub const CMOS_BASE: u64 = 0x70;
pub const CMOS_SIZE: u64 = 2;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// 32.768 kHz time base, 1024 Hz periodic rate; update-in-progress never set.
const REG_A_VALUE: u8 = 0x26;
/// 24-hour mode, BCD.
const REG_B_VALUE: u8 = 0x02;
/// Valid RAM and time.
const REG_D_VALUE: u8 = 0x80;

#[derive(Default)]
pub struct Cmos {
    index: u8,
}

fn bcd(v: u64) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// (year, month, day) of `days` since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The register `reg` for the UTC time `secs` since the epoch.
pub fn register(reg: u8, secs: u64) -> u8 {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    match reg {
        0x00 => bcd(rem % 60),
        0x02 => bcd(rem / 60 % 60),
        0x04 => bcd(rem / 3600),
        0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64),
        0x07 => bcd(day),
        0x08 => bcd(month),
        0x09 => bcd(year.rem_euclid(100) as u64),
        0x32 => bcd((year / 100) as u64),
        REG_A => REG_A_VALUE,
        REG_B => REG_B_VALUE,
        REG_C => 0,
        REG_D => REG_D_VALUE,
        _ => 0,
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 1 {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            register(self.index, secs)
        } else {
            self.index
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = data.first().copied().unwrap_or(0) & 0x7f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cmos_time_registers_in_bcd() {
        // 2026-11-22 05:38:01 UTC (a Sunday).
        let t = 1_795_325_881;
        assert_eq!(register(0x00, t), 0x01);
        assert_eq!(register(0x02, t), 0x38);
        assert_eq!(register(0x04, t), 0x05);
        assert_eq!(register(0x07, t), 0x22);
        assert_eq!(register(0x08, t), 0x11);
        assert_eq!(register(0x09, t), 0x26);
        assert_eq!(register(0x32, t), 0x20);
        assert_eq!(register(0x06, t), 0x01, "Sunday is day 1");
        assert_eq!(register(REG_D, t), 0x80);
    }

    #[test]
    fn test_cmos_index_ignores_nmi_bit() {
        let mut c = Cmos::default();
        c.write(0, &[0x80 | REG_B]);
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], REG_B_VALUE);
    }
}
