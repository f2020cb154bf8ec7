//! TSC frequency discovery and cycle↔time conversion.

use crate::arch::cpuid;

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSource {
    /// `tsc_khz=` on the command line (wins over CPUID).
    Cmdline,
    /// CPUID leaf 0x15 (crystal clock × ratio).
    Cpuid15,
    /// Hypervisor leaf 0x40000010 EAX (KVM/VMware convention).
    Hypervisor,
}

impl TscSource {
    pub fn name(self) -> &'static str {
        match self {
            TscSource::Cmdline => "cmdline",
            TscSource::Cpuid15 => "cpuid_15h",
            TscSource::Hypervisor => "cpuid_40000010h",
        }
    }
}

/// TSC kHz from CPUID, if the (virtual) CPU says.
pub fn khz_from_cpuid() -> Option<(u64, TscSource)> {
    let max_basic = cpuid(0, 0).eax;
    if max_basic >= 0x15 {
        let r = cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            let hz = u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax);
            if hz >= 1_000_000 {
                return Some((hz / 1000, TscSource::Cpuid15));
            }
        }
    }
    let hypervisor = cpuid(1, 0).ecx & (1 << 31) != 0;
    if hypervisor && cpuid(0x4000_0000, 0).eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0).eax;
        if khz >= 1000 {
            return Some((u64::from(khz), TscSource::Hypervisor));
        }
    }
    None
}

/// Converts TSC cycles to nanoseconds and back.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub khz: u64,
}

impl Clock {
    #[inline(always)]
    pub fn cycles_to_ns(&self, cycles: u64) -> u64 {
        (u128::from(cycles) * 1_000_000 / u128::from(self.khz)) as u64
    }
    #[inline(always)]
    pub fn ns_to_cycles(&self, ns: u64) -> u64 {
        (u128::from(ns) * u128::from(self.khz) / 1_000_000) as u64
    }
}
