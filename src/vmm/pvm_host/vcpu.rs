//! The vCPU's side of the host's workarounds: completing the instructions the host's
//! emulator gives up on (KVM_EXIT_INTERNAL_ERROR) and keeping the `syscall` trap in place
//! across exits. Methods of [`VcpuRunner`], kept here so `vcpu.rs` is only the exit loop.

use kvm_bindings::kvm_regs;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::emulate;
use super::syscall_trap::Completed;
use crate::vmm::vcpu::VcpuRunner;

impl VcpuRunner {
    /// Completes `cmpxchg8b/16b` on guest memory, atomically, as the CPU would.
    fn complete_cmpxchg(
        &mut self,
        op: emulate::CmpXchg,
        mut regs: kvm_regs,
        bytes: &[u8],
    ) -> Result<(), String> {
        let rip = regs.rip;
        let what = || format!("`{}` at rip {rip:#x}", emulate::mnemonic(bytes));
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| format!("{}: reading sregs failed: {e}", what()))?;
        let gva = op.address(&regs, sregs.fs.base, sregs.gs.base);
        if gva % op.width as u64 != 0 {
            return Err(format!(
                "{}: operand {gva:#x} is misaligned (the CPU would raise #GP)",
                what()
            ));
        }
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(|e| format!("{}: translating {gva:#x} failed: {e}", what()))?;
        if t.valid == 0 || t.writeable == 0 {
            return Err(format!(
                "{}: operand {gva:#x} is not mapped writable (the guest would take #PF)",
                what()
            ));
        }
        let ptr = self
            .mem
            .get_host_address(GuestAddress(t.physical_address))
            .map_err(|e| {
                format!(
                    "{}: operand {gva:#x} -> {:#x} is not RAM: {e}",
                    what(),
                    t.physical_address
                )
            })?;
        let half = if op.width == 16 { 64 } else { 32 };
        let mask = if op.width == 16 {
            u64::MAX
        } else {
            u32::MAX as u64
        };
        let expected = ((regs.rdx & mask) as u128) << half | (regs.rax & mask) as u128;
        let new = ((regs.rcx & mask) as u128) << half | (regs.rbx & mask) as u128;
        // SAFETY: ptr is the host address of guest RAM at an address aligned to the operand
        // width, so the whole operand lies in one page of one mapped region.
        let (swapped, found) = unsafe { emulate::compare_exchange(ptr, op.width, expected, new) };
        const ZF: u64 = 1 << 6;
        if swapped {
            regs.rflags |= ZF;
        } else {
            regs.rflags &= !ZF;
            regs.rax = (found as u64) & mask;
            regs.rdx = ((found >> half) as u64) & mask;
        }
        regs.rip += op.len as u64;
        self.fd
            .set_regs(&regs)
            .map_err(|e| format!("{}: setting registers failed: {e}", what()))?;
        self.emulated += 1;
        if self.emulated <= 16 {
            log::info!(
                "vcpu{}: completed {} for the host's emulator (#{})",
                self.id,
                what(),
                self.emulated
            );
        }
        Ok(())
    }

    pub(in crate::vmm) fn maintain_syscall_trap(&self) {
        if let Some(trap) = &self.syscall_trap {
            trap.maintain(&self.fd, &self.mem);
        }
    }

    /// An `int3` at the syscall trap: finishes a `syscall` or steps into the #PF handler.
    fn syscall_trap_int3(
        &mut self,
        regs: &mut kvm_bindings::kvm_regs,
    ) -> Option<Result<(), String>> {
        let trap = self.syscall_trap.as_ref()?;
        let rip = regs.rip;
        let done = trap.on_int3(&self.fd, &self.mem, regs)?;
        Some(done.map(|c| {
            if let Completed::Syscall(n) = c {
                if n <= 4 || n.is_power_of_two() {
                    log::info!(
                        "vcpu{}: finished guest syscall #{n} (RAX {:#x}) at the #PF trap {rip:#x}",
                        self.id,
                        regs.rax
                    );
                }
            }
        }))
    }

    /// Completes an instruction the kernel's emulator gave up on, or explains the stop.
    pub(in crate::vmm) fn internal_error(&mut self) -> Result<(), String> {
        let mut regs = self
            .fd
            .get_regs()
            .map_err(|e| format!("KVM internal error; reading registers failed: {e}"))?;
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let Some(bytes) = emulate::failing_instruction(internal.suberror, &internal.data[..n])
        else {
            return Err(format!(
                "KVM internal error, suberror {} at rip {:#x}, data {:x?}",
                internal.suberror,
                regs.rip,
                &internal.data[..n]
            ));
        };
        if bytes.first() == Some(&0xcc) {
            if let Some(done) = self.syscall_trap_int3(&mut regs) {
                return done;
            }
        }
        match emulate::fixup(&bytes) {
            Some(emulate::Fixup::InjectBreakpoint) => {
                // int3 is a trap: the handler sees the address after it.
                regs.rip += 1;
                self.fd
                    .set_regs(&regs)
                    .map_err(|e| format!("int3 at {:#x}: setting RIP failed: {e}", regs.rip - 1))?;
                let mut events = self
                    .fd
                    .get_vcpu_events()
                    .map_err(|e| format!("int3: reading vCPU events failed: {e}"))?;
                events.exception.injected = 1;
                events.exception.nr = 3;
                events.exception.has_error_code = 0;
                self.fd
                    .set_vcpu_events(&events)
                    .map_err(|e| format!("int3: injecting #BP failed: {e}"))?;
                self.emulated += 1;
                if self.emulated <= 16 {
                    log::info!("vcpu{}: injected #BP for int3 at {:#x} (the host's emulator refused it; #{})", self.id, regs.rip - 1, self.emulated);
                }
                Ok(())
            }
            Some(emulate::Fixup::CompareExchange(op)) => self.complete_cmpxchg(op, regs, &bytes),
            Some(fix @ (emulate::Fixup::SetAc(_) | emulate::Fixup::Skip { .. })) => {
                let rip = regs.rip;
                match fix {
                    emulate::Fixup::SetAc(true) => regs.rflags |= emulate::RFLAGS_AC,
                    emulate::Fixup::SetAc(false) => regs.rflags &= !emulate::RFLAGS_AC,
                    _ => {}
                }
                regs.rip += match fix {
                    emulate::Fixup::Skip { len } => len as u64,
                    _ => 3,
                };
                self.fd.set_regs(&regs).map_err(|e| {
                    format!(
                        "{} at {rip:#x}: setting registers failed: {e}",
                        emulate::mnemonic(&bytes)
                    )
                })?;
                self.emulated += 1;
                if self.emulated <= 16 {
                    log::info!(
                        "vcpu{}: completed {} at {rip:#x} for the host's emulator (#{})",
                        self.id,
                        emulate::mnemonic(&bytes),
                        self.emulated
                    );
                }
                Ok(())
            }
            None => Err(format!(
                "the host's instruction emulator cannot run `{}` at rip {:#x} (bytes {})",
                emulate::mnemonic(&bytes),
                regs.rip,
                bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        }
    }
}
