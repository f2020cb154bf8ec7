//! The local APIC in xAPIC mode, programmed from ring 3, and the legacy 8259 PICs.
//!
//! The APIC's page (0xFEE0_0000) lies in the top GiB of the boot page tables, which is
//! mapped User, Writable and uncached (PWT|PCD), so ring 3 reaches its registers with
//! plain MMIO (each access a VM exit to the VMM's in-kernel APIC). x2APIC would need
//! `wrmsr`, which only ring 0 can do, and ring 0 is what these guests avoid.

use crate::arch::{mmio, outb};

/// Default xAPIC base (IA32_APIC_BASE after reset; ringvm, QEMU, Cloud Hypervisor and
/// Firecracker leave it there).
pub const XAPIC_BASE: u64 = 0xfee0_0000;
/// MSI message address for `dest` (physical destination mode, fixed delivery).
pub fn msi_address(dest_apic_id: u8) -> u32 {
    XAPIC_BASE as u32 | (u32::from(dest_apic_id) << 12)
}

const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_SVR: u64 = 0xf0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_THERMAL: u64 = 0x330;
const REG_LVT_PERF: u64 = 0x340;
const REG_LVT_LINT0: u64 = 0x350;
const REG_LVT_LINT1: u64 = 0x360;
const REG_LVT_ERROR: u64 = 0x370;
const LVT_MASKED: u32 = 1 << 16;
/// SVR bit 8: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;

/// Software-enables the local APIC with `spurious` as its spurious vector, every local
/// interrupt (timer, LINT0/1, error, perf, thermal) masked and the task priority at 0, so
/// only messages (MSI) reach the CPU. Returns the APIC's id for MSI destinations.
pub fn enable(spurious: u8) -> u8 {
    for reg in [REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_ERROR] {
        mmio::write32(XAPIC_BASE + reg, LVT_MASKED);
    }
    mmio::write32(XAPIC_BASE + REG_TPR, 0);
    mmio::write32(XAPIC_BASE + REG_SVR, SVR_ENABLE | u32::from(spurious));
    (mmio::read32(XAPIC_BASE + REG_ID) >> 24) as u8
}

/// Whether the APIC reads back as software-enabled.
pub fn is_enabled() -> bool {
    mmio::read32(XAPIC_BASE + REG_SVR) & SVR_ENABLE != 0
}

/// Masks every line of both 8259 PICs. Firmware (QEMU's SeaBIOS) leaves the PIT's IRQ 0
/// unmasked and routed to LINT0 as ExtINT; with LINT0 masked too nothing legacy gets in.
/// Port I/O from ring 3 is allowed by the TSS I/O bitmap.
pub fn mask_pics() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}
