//! CPU primitives usable from ring 3: port I/O (allowed by the TSS I/O
//! bitmap), TSC, CPUID, volatile MMIO and the ring-0 halt gate.

use core::arch::asm;

/// Writes a byte to an I/O port. Each call is a VM exit (~29 µs on the lab hosts).
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the TSS I/O bitmap allows every port.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a 32-bit value to an I/O port.
#[inline]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a 32-bit value from an I/O port.
#[inline]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Writes a 16-bit value to an I/O port.
#[inline]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a 16-bit value from an I/O port.
#[inline]
pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as for `outb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads a byte from an I/O port.
#[inline]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads the time-stamp counter (native in ring 3: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the TSC.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Result of one CPUID leaf.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID (a VM exit, fine outside the data path).
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Cpuid { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// Volatile 8/16/32-bit MMIO and guest-RAM shared-memory accessors.
pub mod mmio {
    use core::ptr::{read_volatile, write_volatile};

    /// Reads a u8 from a device or shared-ring address.
    #[inline(always)]
    pub fn read8(addr: u64) -> u8 {
        // SAFETY: callers pass addresses inside a mapped BAR or a ring they own;
        // 0–4 GiB is identity mapped.
        unsafe { read_volatile(addr as *const u8) }
    }
    #[inline(always)]
    pub fn read16(addr: u64) -> u16 {
        // SAFETY: as for `read8`; callers keep the address 2-byte aligned.
        unsafe { read_volatile(addr as *const u16) }
    }
    #[inline(always)]
    pub fn read32(addr: u64) -> u32 {
        // SAFETY: as for `read8`; callers keep the address 4-byte aligned.
        unsafe { read_volatile(addr as *const u32) }
    }
    #[inline(always)]
    pub fn write8(addr: u64, v: u8) {
        // SAFETY: as for `read8`.
        unsafe { write_volatile(addr as *mut u8, v) }
    }
    #[inline(always)]
    pub fn write16(addr: u64, v: u16) {
        // SAFETY: as for `read16`.
        unsafe { write_volatile(addr as *mut u16, v) }
    }
    #[inline(always)]
    pub fn write32(addr: u64, v: u32) {
        // SAFETY: as for `read32`.
        unsafe { write_volatile(addr as *mut u32, v) }
    }
    /// Writes a 64-bit register as two 32-bit halves, low first (virtio allows it).
    #[inline(always)]
    pub fn write64_split(addr: u64, v: u64) {
        write32(addr, v as u32);
        write32(addr + 4, (v >> 32) as u32);
    }
}
