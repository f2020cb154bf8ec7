//! The hardware-reduced ACPI sleep registers (ACPI 6.5, 4.8.3.7 and 4.8.3.8): the FADT's
//! SLEEP_CONTROL_REG and SLEEP_STATUS_REG, one byte each on two I/O ports. A guest powers
//! the machine off the way Linux's `acpi_hw_extended_sleep` does: it takes SLP_TYP from the
//! DSDT's `\_S5` package and writes `SLP_TYP << 2 | SLP_EN` to the control register. That
//! write ends the VM in an orderly way ([`ExitReason::PowerOff`], exit status 0).
//!
//! Only S5 is offered (the DSDT has no `\_S1`..`\_S4`), so no guest waits for a wake-up;
//! the status register reads 0 and ignores the WAK_STS clear that precedes every sleep.

use crate::vmm::bus::BusDevice;
use crate::vmm::exit::{ExitHandle, ExitReason};

/// SLEEP_CONTROL_REG's port; SLEEP_STATUS_REG is the next one. Outside every port another
/// device of ringvm claims (serial 0x3f8, i8042 0x60, CMOS 0x70, debug-exit 0xf4, PCI
/// 0xcf8); 0x600 is also where Cloud Hypervisor puts its register, so guests' tooling knows it.
pub const ACPI_SLEEP_BASE: u64 = 0x600;
/// Control and status: one byte each.
pub const ACPI_SLEEP_SIZE: u64 = 2;
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// The sleep type of S5 (soft off), the value of `\_S5`'s first element in the DSDT.
pub const SLP_TYP_S5: u8 = 5;
/// SLEEP_CONTROL_REG fields: SLP_TYP in bits 2..=4, SLP_EN in bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;

/// The two sleep registers.
pub struct AcpiSleep {
    exit: ExitHandle,
}

impl AcpiSleep {
    pub fn new(exit: ExitHandle) -> Self {
        AcpiSleep { exit }
    }
}

/// The control register value that enters sleep type `slp_typ`.
pub fn sleep_control_value(slp_typ: u8) -> u8 {
    ((slp_typ << SLP_TYP_SHIFT) & SLP_TYP_MASK) | SLP_EN
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // WAK_STS never set: there is no sleep state to wake from.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != SLEEP_CONTROL_OFFSET {
            return;
        }
        let Some(&v) = data.first() else {
            return;
        };
        if v & SLP_EN == 0 {
            return;
        }
        let slp_typ = (v & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if slp_typ == SLP_TYP_S5 {
            self.exit.request(ExitReason::PowerOff);
        } else {
            // Not offered in the DSDT; a guest asking anyway keeps running.
            log::warn!("guest asked for ACPI sleep type {slp_typ}, which ringvm does not offer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_acpi_sleep_s5_with_slp_en_requests_power_off() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = AcpiSleep::new(exit.clone());
        dev.write(SLEEP_CONTROL_OFFSET, &[sleep_control_value(SLP_TYP_S5)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(exit.reason().unwrap().status(), 0);
    }

    #[test]
    fn test_acpi_sleep_without_slp_en_or_other_type_keeps_running() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = AcpiSleep::new(exit.clone());
        // S5 type without SLP_EN, S3 with SLP_EN, garbage, and WAK_STS cleared on status.
        dev.write(SLEEP_CONTROL_OFFSET, &[SLP_TYP_S5 << SLP_TYP_SHIFT]);
        dev.write(SLEEP_CONTROL_OFFSET, &[sleep_control_value(3)]);
        dev.write(SLEEP_CONTROL_OFFSET, &[]);
        dev.write(SLEEP_STATUS_OFFSET, &[0x80]);
        // S5 with SLP_EN on the status register is not a sleep request either.
        dev.write(SLEEP_STATUS_OFFSET, &[sleep_control_value(SLP_TYP_S5)]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn test_acpi_sleep_status_reads_zero() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = AcpiSleep::new(exit);
        let mut b = [0xffu8; 1];
        dev.read(SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn test_sleep_control_value_matches_linux_encoding() {
        // ACPI_X_SLEEP_TYPE_POSITION 2, ACPI_X_SLEEP_ENABLE 0x20: S5 is 0x34.
        assert_eq!(sleep_control_value(SLP_TYP_S5), 0x34);
    }
}
