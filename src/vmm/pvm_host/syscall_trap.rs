//! `syscall` from guest user mode on this lab's nested PVM host (`kvm_pvm`).
//!
//! The host runs guest ring 3 natively and emulates ring 0. A native `syscall` in guest
//! ring 3 comes back half done: RCX and R11 hold the return RIP and RFLAGS and RIP is
//! MSR_LSTAR, but the vCPU stays at CPL 3, on the user stack, with RFLAGS unmasked. Its
//! next fetch, of the kernel's supervisor-only entry code, raises #PF, which the host
//! delivers through the guest's IDT into (emulated) ring 0, and no VM exit reaches the VMM
//! on the way. Linux then kills the process (`segfault at <entry_SYSCALL_64> … error 15`).
//!
//! ringvm finishes the `syscall` at that #PF. Once the guest has set MSR_LSTAR it plants an
//! `int3` over the first instruction of the guest's #PF handler (found through the IDT).
//! The host's emulator refuses `int3` (KVM_EXIT_INTERNAL_ERROR), so every #PF now stops in
//! ringvm at the handler's first byte, with the exception frame on the stack:
//!
//! - a fault from CPL 3 at RIP = MSR_LSTAR is the unfinished `syscall`: ringvm drops the
//!   frame and completes the instruction as the CPU would — RSP back to the user stack,
//!   RFLAGS = R11 & ~MSR_FMASK, RIP = MSR_LSTAR — at CPL 0, where the #PF delivery left it;
//! - any other #PF goes on into the handler once ringvm has completed the displaced
//!   instruction. The trap is only planted over an instruction ringvm can complete
//!   exactly: a NOP form (Linux's `ASM_CLAC` without SMAP), `clac` or `endbr64`.
//!
//! The guest may rewrite its own text (Linux's alternatives pass turns `90 90 90` into
//! `0f 1f 00` there), so the planted byte is checked at every PIO/MMIO exit and planted
//! again if it is gone; the IDT and MSR_LSTAR are re-read every [`REVALIDATE_EVERY`] exits
//! and the trap moves (restoring the old byte) if the handler did. `sysretq` back to user
//! mode is emulated by the host itself. Guests that never set MSR_LSTAR (ringvm's
//! bare-metal guests) cost one MSR read per PIO/MMIO exit and are otherwise untouched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMemory;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_FMASK: u32 = 0xc000_0084;
const EFER_SCE: u64 = 1;
const PF_VECTOR: u64 = 14;
const INT3: u8 = 0xcc;
const RFLAGS_FIXED: u64 = 1 << 1;
const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS.AC, cleared by a displaced `clac`.
const RFLAGS_AC: u64 = 1 << 18;

/// Exits between full checks of the IDT's #PF gate and MSR_LSTAR.
pub const REVALIDATE_EVERY: u64 = 256;

/// The instruction the planted `int3` displaces, which ringvm completes for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Displaced {
    /// A NOP form of this many bytes.
    Nop(u8),
    /// `clac` (0f 01 ca): clears RFLAGS.AC.
    Clac,
    /// `endbr64` (f3 0f 1e fa): no effect without CET.
    Endbr64,
}

impl Displaced {
    /// Recognises the first instruction at `bytes`, if ringvm can complete it exactly.
    pub fn decode(bytes: &[u8]) -> Option<Displaced> {
        match bytes {
            [0x90, ..] => Some(Displaced::Nop(1)),
            [0x66, 0x90, ..] => Some(Displaced::Nop(2)),
            [0x0f, 0x1f, 0x00, ..] => Some(Displaced::Nop(3)),
            [0x0f, 0x1f, 0x40, _, ..] => Some(Displaced::Nop(4)),
            [0x0f, 0x1f, 0x44, 0x00, _, ..] => Some(Displaced::Nop(5)),
            [0x0f, 0x01, 0xca, ..] => Some(Displaced::Clac),
            [0xf3, 0x0f, 0x1e, 0xfa, ..] => Some(Displaced::Endbr64),
            _ => None,
        }
    }

    /// Its length in bytes.
    pub fn length(self) -> u64 {
        match self {
            Displaced::Nop(n) => n as u64,
            Displaced::Clac => 3,
            Displaced::Endbr64 => 4,
        }
    }

    /// Its first byte (what the planted `int3` replaced).
    pub fn first_byte(self) -> u8 {
        match self {
            Displaced::Nop(1) => 0x90,
            Displaced::Nop(2) => 0x66,
            Displaced::Nop(_) | Displaced::Clac => 0x0f,
            Displaced::Endbr64 => 0xf3,
        }
    }

    /// Executes it on `regs`: the effect and the step past it.
    pub fn complete(self, regs: &mut kvm_regs) {
        if self == Displaced::Clac {
            regs.rflags &= !RFLAGS_AC;
        }
        regs.rip = regs.rip.wrapping_add(self.length());
    }

    fn encode(self) -> u64 {
        match self {
            Displaced::Nop(n) => n as u64,
            Displaced::Clac => 0x100,
            Displaced::Endbr64 => 0x200,
        }
    }

    fn from_code(code: u64) -> Displaced {
        match code {
            0x100 => Displaced::Clac,
            0x200 => Displaced::Endbr64,
            n => Displaced::Nop(n as u8),
        }
    }
}

/// The handler offset of a 64-bit IDT gate, if the gate is present.
pub fn gate_offset(gate: &[u8; 16]) -> Option<u64> {
    if gate[5] & 0x80 == 0 {
        return None;
    }
    let lo = u16::from_le_bytes([gate[0], gate[1]]) as u64;
    let mid = u16::from_le_bytes([gate[6], gate[7]]) as u64;
    let hi = u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]) as u64;
    Some(lo | mid << 16 | hi << 32)
}

/// The frame a #PF pushes in 64-bit mode, lowest address first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultFrame {
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl FaultFrame {
    pub const SIZE: usize = 48;

    pub fn parse(raw: &[u8; Self::SIZE]) -> FaultFrame {
        let w = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap());
        FaultFrame {
            error_code: w(0),
            rip: w(1),
            cs: w(2),
            rflags: w(3),
            rsp: w(4),
            ss: w(5),
        }
    }

    /// True for the host's unfinished `syscall`: a fault from CPL 3 at MSR_LSTAR.
    pub fn is_unfinished_syscall(&self, lstar: u64) -> bool {
        lstar != 0 && self.cs & 3 == 3 && self.rip == lstar
    }
}

/// Completes `syscall` on the registers the #PF delivery left: the user RSP from the frame,
/// RFLAGS from R11 (where the host saved them) masked by MSR_FMASK, RIP = MSR_LSTAR. RCX
/// already holds the return address.
pub fn finish_syscall(regs: &mut kvm_regs, frame: &FaultFrame, lstar: u64, fmask: u64) {
    regs.rsp = frame.rsp;
    regs.rip = lstar;
    regs.rflags = (regs.r11 & !fmask & !RFLAGS_RF) | RFLAGS_FIXED;
}

/// What [`SyscallTrap::on_int3`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// Finished a `syscall` (the count so far).
    Syscall(u64),
    /// An ordinary #PF: stepped over the displaced instruction.
    PageFault,
}

#[derive(Debug, Clone, Copy)]
struct Planted {
    handler: u64,
    gpa: u64,
    displaced: Displaced,
}

/// The trap, shared by all vCPUs of a VM.
#[derive(Default)]
pub struct SyscallTrap {
    /// Guest-virtual address of the #PF handler carrying the `int3` (0: none planted).
    handler: AtomicU64,
    /// Its guest-physical address.
    gpa: AtomicU64,
    /// The displaced instruction ([`Displaced::encode`]).
    displaced: AtomicU64,
    /// MSR_LSTAR when the trap was last checked.
    lstar: AtomicU64,
    exits: AtomicU64,
    syscalls: AtomicU64,
    warned: AtomicBool,
    /// Serialises planting between vCPUs (never taken on the fast check).
    planting: Mutex<()>,
}

impl SyscallTrap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Syscalls finished so far.
    pub fn syscalls(&self) -> u64 {
        self.syscalls.load(Ordering::Relaxed)
    }

    fn planted(&self) -> Option<Planted> {
        let handler = self.handler.load(Ordering::Acquire);
        (handler != 0).then(|| Planted {
            handler,
            gpa: self.gpa.load(Ordering::Relaxed),
            displaced: Displaced::from_code(self.displaced.load(Ordering::Relaxed)),
        })
    }

    /// Called after each PIO/MMIO exit: keeps the `int3` in place (see the module docs).
    pub fn maintain(&self, fd: &VcpuFd, mem: &GuestMemory) {
        if let Some(p) = self.planted() {
            let n = self.exits.fetch_add(1, Ordering::Relaxed);
            if n % REVALIDATE_EVERY != 0
                && mem.read_obj::<u8>(GuestAddress(p.gpa)).ok() == Some(INT3)
            {
                return;
            }
        }
        if let Err(why) = self.plant(fd, mem) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!("syscall from guest user mode will fail on this host: {why}");
            }
        }
    }

    /// Finds the #PF handler and plants (or re-plants, or moves) the `int3`.
    fn plant(&self, fd: &VcpuFd, mem: &GuestMemory) -> Result<(), String> {
        let _serial = self.planting.lock().unwrap_or_else(|e| e.into_inner());
        let [efer, lstar] = read_msrs(fd, [MSR_EFER, MSR_LSTAR])?;
        if lstar == 0 || efer & EFER_SCE == 0 {
            return Ok(()); // no syscall set up (yet)
        }
        self.lstar.store(lstar, Ordering::Relaxed);
        let sregs = fd
            .get_sregs()
            .map_err(|e| format!("reading sregs failed: {e}"))?;
        if (sregs.idt.limit as u64) < PF_VECTOR * 16 + 15 {
            return Ok(()); // no #PF gate yet
        }
        let mut gate = [0u8; 16];
        read_virt(fd, mem, sregs.idt.base + PF_VECTOR * 16, &mut gate)?;
        let Some(handler) = gate_offset(&gate) else {
            return Ok(());
        };
        let mut code = [0u8; 8];
        let gpa = read_virt(fd, mem, handler, &mut code)?;
        let old = self.planted();
        let same = old.is_some_and(|p| p.handler == handler && p.gpa == gpa);
        if same && code[0] == INT3 {
            return Ok(());
        }
        // Same place but the guest rewrote the byte: decode what is there now.
        if let Some(p) = old.filter(|_| !same) {
            // The handler moved: give the old location its byte back.
            if mem.read_obj::<u8>(GuestAddress(p.gpa)).ok() == Some(INT3) {
                let _ = mem.write_obj(p.displaced.first_byte(), GuestAddress(p.gpa));
            }
            self.handler.store(0, Ordering::Release);
        }
        let Some(displaced) = Displaced::decode(&code) else {
            self.handler.store(0, Ordering::Release);
            return Err(format!(
                "the guest's #PF handler at {handler:#x} starts with {code:02x?}, which ringvm \
                 cannot step over, so it plants no trap there"
            ));
        };
        mem.write_obj(INT3, GuestAddress(gpa))
            .map_err(|e| format!("writing the trap at {gpa:#x} failed: {e}"))?;
        self.gpa.store(gpa, Ordering::Relaxed);
        self.displaced.store(displaced.encode(), Ordering::Relaxed);
        self.handler.store(handler, Ordering::Release);
        if old.is_none() {
            log::info!(
                "nested PVM host: finishing guest user-mode syscalls at the #PF handler \
                 {handler:#x} (MSR_LSTAR {lstar:#x}; int3 over {displaced:?})"
            );
        }
        Ok(())
    }

    /// For an `int3` the host's emulator refused at `regs.rip`: `None` if it is not the
    /// trap, else what ringvm did (registers already written back).
    pub fn on_int3(
        &self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        regs: &mut kvm_regs,
    ) -> Option<Result<Completed, String>> {
        let p = self.planted().filter(|p| p.handler == regs.rip)?;
        Some(self.complete(fd, mem, regs, p))
    }

    fn complete(
        &self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        regs: &mut kvm_regs,
        p: Planted,
    ) -> Result<Completed, String> {
        let mut raw = [0u8; FaultFrame::SIZE];
        read_virt(fd, mem, regs.rsp, &mut raw)
            .map_err(|e| format!("#PF trap: reading the exception frame: {e}"))?;
        let frame = FaultFrame::parse(&raw);
        let lstar = self.lstar.load(Ordering::Relaxed);
        let done = if frame.is_unfinished_syscall(lstar) {
            let [fmask] = read_msrs(fd, [MSR_FMASK])?;
            finish_syscall(regs, &frame, lstar, fmask);
            Completed::Syscall(self.syscalls.fetch_add(1, Ordering::Relaxed) + 1)
        } else {
            p.displaced.complete(regs);
            Completed::PageFault
        };
        fd.set_regs(regs)
            .map_err(|e| format!("#PF trap: setting registers failed: {e}"))?;
        Ok(done)
    }
}

fn read_msrs<const N: usize>(fd: &VcpuFd, index: [u32; N]) -> Result<[u64; N], String> {
    let entries = index.map(|index| kvm_msr_entry {
        index,
        ..Default::default()
    });
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(|e| format!("reading MSRs {index:#x?} failed: {e}"))?;
    if n != N {
        return Err(format!("KVM returned {n} of the MSRs {index:#x?}"));
    }
    let mut out = [0u64; N];
    for (o, e) in out.iter_mut().zip(msrs.as_slice()) {
        *o = e.data;
    }
    Ok(out)
}

/// Reads guest-virtual memory through the vCPU's page tables (KVM_TRANSLATE, page by
/// page); returns the guest-physical address of the first byte.
fn read_virt(fd: &VcpuFd, mem: &GuestMemory, gva: u64, buf: &mut [u8]) -> Result<u64, String> {
    let mut first = None;
    let mut done = 0;
    while done < buf.len() {
        let va = gva.wrapping_add(done as u64);
        let t = fd
            .translate_gva(va)
            .map_err(|e| format!("translating {va:#x} failed: {e}"))?;
        if t.valid == 0 {
            return Err(format!("{va:#x} is not mapped"));
        }
        let in_page = (4096 - (va & 4095)) as usize;
        let n = in_page.min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], GuestAddress(t.physical_address))
            .map_err(|e| format!("{va:#x} -> {:#x} is not RAM: {e}", t.physical_address))?;
        first.get_or_insert(t.physical_address);
        done += n;
    }
    Ok(first.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_displaced_decodes_only_what_it_can_complete() {
        assert_eq!(
            Displaced::decode(&[0x90, 0x90, 0x90]),
            Some(Displaced::Nop(1))
        );
        assert_eq!(
            Displaced::decode(&[0x0f, 0x1f, 0x00, 0xfc]),
            Some(Displaced::Nop(3))
        );
        assert_eq!(
            Displaced::decode(&[0x0f, 0x01, 0xca, 0xfc]),
            Some(Displaced::Clac)
        );
        assert_eq!(
            Displaced::decode(&[0xf3, 0x0f, 0x1e, 0xfa]),
            Some(Displaced::Endbr64)
        );
        // push $14, an int3 already planted, and a truncated NOP are refused.
        assert_eq!(Displaced::decode(&[0x6a, 0x0e]), None);
        assert_eq!(Displaced::decode(&[0xcc, 0x1f, 0x00]), None);
        assert_eq!(Displaced::decode(&[0x0f, 0x1f]), None);
        for d in [
            Displaced::Nop(1),
            Displaced::Nop(3),
            Displaced::Nop(5),
            Displaced::Clac,
            Displaced::Endbr64,
        ] {
            assert_eq!(Displaced::from_code(d.encode()), d);
        }
        assert_eq!(Displaced::Clac.first_byte(), 0x0f);
        assert_eq!(Displaced::Nop(1).first_byte(), 0x90);
    }

    #[test]
    fn test_displaced_complete_steps_and_clears_ac() {
        let mut regs = kvm_regs {
            rip: 0x1000,
            rflags: RFLAGS_AC | 2,
            ..Default::default()
        };
        Displaced::Clac.complete(&mut regs);
        assert_eq!((regs.rip, regs.rflags), (0x1003, 2));
        let mut regs = kvm_regs {
            rip: 0x1000,
            rflags: RFLAGS_AC | 2,
            ..Default::default()
        };
        Displaced::Nop(1).complete(&mut regs);
        assert_eq!((regs.rip, regs.rflags), (0x1001, RFLAGS_AC | 2));
    }

    #[test]
    fn test_gate_offset_joins_the_three_fields() {
        let h: u64 = 0xffff_ffff_81c0_1230;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(h as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        gate[5] = 0x8e;
        gate[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
        assert_eq!(gate_offset(&gate), Some(h));
        gate[5] = 0x0e;
        assert_eq!(gate_offset(&gate), None, "not present");
    }

    fn frame(rip: u64, cs: u64) -> FaultFrame {
        let mut raw = [0u8; FaultFrame::SIZE];
        for (i, v) in [0x15, rip, cs, 0x246, 0x7ffe_0000, 0x2b].iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        FaultFrame::parse(&raw)
    }

    #[test]
    fn test_only_a_user_fault_at_lstar_is_a_syscall() {
        let lstar = 0xffff_ffff_81c0_0080;
        assert!(frame(lstar, 0x33).is_unfinished_syscall(lstar));
        assert!(
            !frame(lstar, 0x10).is_unfinished_syscall(lstar),
            "kernel-mode fault"
        );
        assert!(
            !frame(0x40_1000, 0x33).is_unfinished_syscall(lstar),
            "user fault elsewhere"
        );
        assert!(!frame(0, 0x33).is_unfinished_syscall(0), "LSTAR unset");
    }

    #[test]
    fn test_finish_syscall_restores_user_stack_and_masks_flags() {
        let lstar = 0xffff_ffff_81c0_0080;
        let f = frame(lstar, 0x33);
        assert_eq!((f.error_code, f.rflags, f.ss), (0x15, 0x246, 0x2b));
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_81c0_1230,
            rsp: 0xffff_c900_0000_3fd8,
            rcx: 0x49_641b,
            r11: 0x10246,
            rflags: 0x2,
            ..Default::default()
        };
        // Linux's MSR_FMASK: TF DF IF IOPL AC NT.
        finish_syscall(&mut regs, &f, lstar, 0x47700);
        assert_eq!(regs.rip, lstar);
        assert_eq!(regs.rsp, 0x7ffe_0000);
        assert_eq!(
            regs.rflags, 0x46,
            "IF and RF cleared, ZF/PF kept, bit 1 set"
        );
        assert_eq!(regs.rcx, 0x49_641b, "return address untouched");
    }
}
