//! A vCPU: its boot-time register state and the thread loop that runs it and dispatches
//! its exits to the PIO/MMIO buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs, KVM_MP_STATE_HALTED,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::bus::Bus;
use super::exit::{ExitHandle, ExitReason};
use super::layout::*;
use super::pvm_host::syscall_trap::SyscallTrap;
use crate::devices::virtio::GuestMemory;

/// Where and how the guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode with an identity map, RSI = `boot_params`.
    Linux64 { entry: u64, zero_page: u64 },
}

/// Errors from configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("Failed to create vCPU {id}")]
    Create {
        id: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Failed to set {what} on vCPU {id}")]
    Setup {
        id: u64,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Failed to write the boot {what} into guest memory")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without it a guest that reads its MTRRs
/// would run all of RAM uncached.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        // KVM wants the limit in bytes: scale 4 KiB granularity here.
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Writes the boot GDT and returns sregs with flat segments loaded from it.
fn boot_segments(
    mem: &GuestMemory,
    sregs: &mut kvm_sregs,
    long_mode: bool,
) -> Result<(), VcpuError> {
    let code = if long_mode {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))
            .map_err(|source| VcpuError::Memory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(|source| VcpuError::Memory {
            what: "IDT",
            source,
        })?;
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(gdt[1], 0x08);
    let data = segment(gdt[2], 0x10);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 0x18);
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages for the Linux 64-bit entry.
fn boot_page_tables(mem: &GuestMemory) -> Result<(), VcpuError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|source| VcpuError::Memory {
                what: "page tables",
                source,
            })
    };
    w(PDPTE_ADDR | 0x03, PML4_ADDR)?;
    w(PDE_ADDR | 0x03, PDPTE_ADDR)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PDE_ADDR + i * 8)?;
    }
    Ok(())
}

/// Sets the register state the boot protocol promises at entry.
pub fn setup_boot_state(
    vcpu: &VcpuFd,
    id: u64,
    mem: &GuestMemory,
    entry: EntryPoint,
) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError::Setup { id, what, source };
    let mut sregs = vcpu.get_sregs().map_err(err("sregs"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { entry, start_info } => {
            boot_segments(mem, &mut sregs, false)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        EntryPoint::Linux64 { entry, zero_page } => {
            boot_segments(mem, &mut sregs, true)?;
            boot_page_tables(mem)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
        }
    }
    vcpu.set_sregs(&sregs).map_err(err("sregs"))?;
    vcpu.set_regs(&regs).map_err(err("regs"))?;
    setup_ap_state(vcpu, id)
}

/// State every vCPU needs: FPU defaults, boot MSRs and the LAPIC's LINT pins. Application
/// processors get only this and wait (in KVM) for INIT/SIPI from the boot CPU.
pub fn setup_ap_state(vcpu: &VcpuFd, id: u64) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError::Setup { id, what, source };
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("fpu"))?;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).expect("fewer MSRs than KVM_MAX_MSR_ENTRIES");
    vcpu.set_msrs(&msrs).map_err(err("msrs"))?;
    setup_lint(vcpu).map_err(err("lapic"))?;
    Ok(())
}

/// LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as a BIOS leaves them.
fn setup_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

/// Shared between a vCPU thread and the main thread.
#[derive(Default)]
pub struct VcpuShared {
    /// Set by the main thread: leave the run loop at the next exit.
    pub stop: AtomicBool,
    /// Set by the vCPU thread: halted with interrupts disabled (only NMI/INIT could wake it).
    pub dead_halted: AtomicBool,
}

/// The body of a vCPU thread.
pub struct VcpuRunner {
    pub id: usize,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitHandle,
    pub shared: Arc<VcpuShared>,
    /// Instructions completed on behalf of the host's emulator (see `pvm_host::emulate`).
    pub emulated: u64,
    /// Guest memory, for instructions ringvm completes itself.
    pub mem: GuestMemory,
    /// Finishes guest user-mode `syscall` on the nested PVM host (see `pvm_host::syscall_trap`).
    pub syscall_trap: Option<Arc<SyscallTrap>>,
}

impl VcpuRunner {
    /// Runs the vCPU until the VM stops or it hits an exit it cannot handle.
    pub fn run(mut self) {
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(port as u64, data) {
                        log::debug!("vcpu{}: unhandled out {port:#x}", self.id);
                    }
                    self.maintain_syscall_trap();
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio.read(port as u64, data);
                    self.maintain_syscall_trap();
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        log::debug!("vcpu{}: unhandled MMIO read {addr:#x}", self.id);
                    }
                    self.maintain_syscall_trap();
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        log::debug!("vcpu{}: unhandled MMIO write {addr:#x}", self.id);
                    }
                    self.maintain_syscall_trap();
                }
                Ok(VcpuExit::Shutdown) => {
                    self.exit.request(ExitReason::Shutdown { vcpu: self.id });
                    return;
                }
                Ok(VcpuExit::Hlt) => {
                    // Only seen without an in-kernel LAPIC; treat like a dead halt check.
                    self.check_halted();
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    let reason = match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                        _ => ExitReason::Shutdown { vcpu: self.id },
                    };
                    self.exit.request(reason);
                    return;
                }
                Ok(VcpuExit::InternalError) => {
                    if let Err(message) = self.internal_error() {
                        self.exit.request(ExitReason::VcpuError {
                            vcpu: self.id,
                            message,
                        });
                        return;
                    }
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    let message =
                        format!("VM entry failed (hardware reason {reason:#x}) on host cpu {cpu}");
                    self.exit.request(ExitReason::VcpuError {
                        vcpu: self.id,
                        message,
                    });
                    return;
                }
                Ok(other) => {
                    let message = format!("unexpected exit {other:?}");
                    self.exit.request(ExitReason::VcpuError {
                        vcpu: self.id,
                        message,
                    });
                    return;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.check_halted();
                }
                Err(e) => {
                    self.exit.request(ExitReason::VcpuError {
                        vcpu: self.id,
                        message: format!("KVM_RUN failed: {e}"),
                    });
                    return;
                }
            }
        }
    }

    fn check_halted(&self) {
        let halted = self
            .fd
            .get_mp_state()
            .is_ok_and(|s| s.mp_state == KVM_MP_STATE_HALTED);
        let if_clear = self.fd.get_regs().is_ok_and(|r| r.rflags & (1 << 9) == 0);
        self.shared
            .dead_halted
            .store(halted && if_clear, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gdt_entry_round_trips_through_segment() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let s = segment(code, 0x08);
        assert_eq!((s.l, s.db, s.type_, s.present, s.g), (1, 0, 0xb, 1, 1));
        assert_eq!(s.limit, 0xffff_ffff);
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 0x18);
        assert_eq!((s.s, tss.s, tss.type_, tss.limit), (1, 0, 0xb, 0x67));
    }
}
