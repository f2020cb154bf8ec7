//! Ending the VM: the isa-debug-exit port (QEMU and ringvm), i8042 reset.

/// isa-debug-exit port: writing v ends the VM, host status (v << 1) | 1 under QEMU.
pub const EXIT_PORT: u16 = 0xf4;

/// Ends the VM with `code`. If no exit device answers, a triple fault ends it.
pub fn exit(code: u32) -> ! {
    crate::arch::outl(EXIT_PORT, code);
    triple_fault()
}

/// Raises #UD with no IDT loaded: the VMM sees a shutdown (triple fault).
pub fn triple_fault() -> ! {
    // SAFETY: deliberately ends the VM.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// Asks the i8042 keyboard controller to pulse the reset line.
pub fn i8042_reset() -> ! {
    crate::arch::outb(0x64, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}
