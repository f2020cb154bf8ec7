//! Interrupts for guests that opt in (`guest_irq_opt_in`): a 256-entry IDT that the boot
//! stub loads, one minimal ring-0 handler per device queue, and the per-queue cells those
//! handlers write for ring 3 to read.
//!
//! Ring 0 is emulated on the lab hosts (~1 µs an instruction), so a handler is ten
//! instructions: save two registers, stamp the TSC into its queue's cell, count, write
//! the local APIC's EOI, restore, `iretq`. Everything else (filling the gates, the APIC,
//! MSI-X, arming the queues) is done by ring 3, natively: the IDT lives in ordinary
//! identity-mapped memory that ring 3 writes before it lets interrupts in.
//!
//! Until [`install`] fills a gate, every vector of the IDT is not present, so an interrupt
//! or exception ends the VM in a triple fault, exactly as the boot stub's empty IDT does
//! for guests that do not opt in. Ring 3 starts with RFLAGS.IF = 0; [`enable`] sets it
//! with one `int3` into a DPL-3 gate whose ring-0 stub sets IF in the frame it returns
//! through (ring 3 cannot `sti` on these hosts, whatever IOPL says).

/// First vector used for queue interrupts: queue `q` gets `VECTOR_BASE + q`.
pub const VECTOR_BASE: u8 = 0x40;
/// Queue vectors the image has handlers for.
pub const MAX_QUEUE_VECTORS: usize = 64;
/// The local APIC's spurious-interrupt vector (its handler only returns).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// #BP: ring 3's `int3` that turns interrupts on.
const BP_VECTOR: usize = 3;
/// Bytes between consecutive queue handlers (each starts on its own 64-byte line).
const STUB_STRIDE: u64 = 64;
/// Bytes per queue cell (a cache line each, so handlers of different queues never share).
const CELL_STRIDE: usize = 8;

/// Interrupt gate, present, DPL 0 (reachable by hardware interrupts only).
const GATE_INTR_DPL0: u8 = 0x8e;
/// Interrupt gate, present, DPL 3 (reachable by `int3` from ring 3).
const GATE_INTR_DPL3: u8 = 0xee;

#[cfg(not(test))]
core::arch::global_asm!(
    r#"
    .set KERNEL_CS, 0x10
    .set APIC_EOI, 0xfee000b0
    .set IRQ_QUEUES, 64
    .set IRQ_CELL, 64

    .section .text.irq, "ax", @progbits
    /* Queue handler n: stamp the TSC (cell + 8), count (cell + 0), EOI, return.
       Ring 3 reads the count first and the stamp after it; x86 keeps the two stores
       in order. */
    .balign 64
    .global irq_stubs
irq_stubs:
    .set irq_n, 0
    .rept IRQ_QUEUES
    .balign 64
    pushq %rax
    pushq %rdx
    rdtsc
    movl %eax, irq_cells + IRQ_CELL * irq_n + 8(%rip)
    movl %edx, irq_cells + IRQ_CELL * irq_n + 12(%rip)
    incq irq_cells + IRQ_CELL * irq_n(%rip)
    movl $APIC_EOI, %eax
    movl $0, (%rax)
    popq %rdx
    popq %rax
    iretq
    .set irq_n, irq_n + 1
    .endr

    /* The APIC's spurious vector: no EOI (the SDM says so), nothing to record. It follows
       the last queue handler at 64 * 64 bytes when every handler fits its 64 (install()
       checks). */
    .balign 64
    .global irq_spurious_stub
irq_spurious_stub:
    iretq

    /* #BP from ring 3 (`int3`): return with IF set. The frame is RIP, CS, RFLAGS, RSP, SS. */
    .balign 64
    .global irq_enable_stub
irq_enable_stub:
    orq $0x200, 16(%rsp)
    iretq

    .section .data.irq, "aw", @progbits
    .balign 16
    .global irq_idt_ptr
irq_idt_ptr:
    .word 256 * 16 - 1
    .quad irq_idt

    .section .bss.irq, "aw", @nobits
    .balign 4096
    .global irq_idt
irq_idt:
    .skip 256 * 16
    .balign 64
    .global irq_cells
irq_cells:
    .skip IRQ_QUEUES * IRQ_CELL
    .text
"#,
    options(att_syntax)
);

#[cfg(not(test))]
extern "C" {
    static irq_stubs: u8;
    static irq_spurious_stub: u8;
    static irq_enable_stub: u8;
    static mut irq_idt: [u64; 512];
    static irq_cells: [u64; MAX_QUEUE_VECTORS * CELL_STRIDE];
}

/// The two quadwords of a 64-bit IDT gate to `handler` in the kernel code segment.
pub fn gate(handler: u64, type_attr: u8) -> [u64; 2] {
    let lo = (handler & 0xffff)
        | (u64::from(crate::boot::KERNEL_CS) << 16)
        | (u64::from(type_attr) << 40)
        | ((handler >> 16) & 0xffff) << 48;
    [lo, handler >> 32]
}

/// Why interrupts could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// More queues than the image has handlers for.
    TooManyQueues,
    /// The handlers are not 64 bytes apart (one outgrew its slot): a build error.
    StubLayout,
}

/// Fills the gates for `queues` queue vectors, the spurious vector and the `int3` that
/// [`enable`] uses. Interrupts stay off.
#[cfg(not(test))]
pub fn install(queues: usize) -> Result<(), IrqError> {
    if queues > MAX_QUEUE_VECTORS {
        return Err(IrqError::TooManyQueues);
    }
    let stubs = &raw const irq_stubs as u64;
    if &raw const irq_spurious_stub as u64 - stubs != STUB_STRIDE * MAX_QUEUE_VECTORS as u64 {
        return Err(IrqError::StubLayout);
    }
    let idt = &raw mut irq_idt as *mut u64;
    let set = |vector: usize, g: [u64; 2]| {
        // SAFETY: vector < 256, so both quadwords are inside the 4 KiB IDT; it is ordinary
        // RAM that no interrupt reads while IF is 0 (the gate is not in use yet).
        unsafe {
            core::ptr::write_volatile(idt.add(2 * vector), g[0]);
            core::ptr::write_volatile(idt.add(2 * vector + 1), g[1]);
        }
    };
    for q in 0..queues {
        set(usize::from(VECTOR_BASE) + q, gate(stubs + STUB_STRIDE * q as u64, GATE_INTR_DPL0));
    }
    set(usize::from(SPURIOUS_VECTOR), gate(&raw const irq_spurious_stub as u64, GATE_INTR_DPL0));
    set(BP_VECTOR, gate(&raw const irq_enable_stub as u64, GATE_INTR_DPL3));
    Ok(())
}

/// Sets RFLAGS.IF in ring 3: one `int3`, whose ring-0 stub returns with IF set. Needs
/// [`install`] first (without its gate the `int3` is a triple fault).
#[cfg(not(test))]
pub fn enable() {
    // SAFETY: the #BP gate installed above returns to the next instruction with every
    // register as it was and IF set; memory is not touched.
    unsafe { core::arch::asm!("int3", options(nomem, nostack)) };
}

/// Whether RFLAGS.IF is set (what [`enable`] achieved).
pub fn enabled() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack (pushfq/pop); the red zone is not used.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags, options(preserves_flags)) };
    flags & 0x200 != 0
}

/// What queue `q`'s handler has recorded: (interrupts so far, TSC at the latest one).
#[cfg(not(test))]
#[inline(always)]
pub fn cell(q: usize) -> (u64, u64) {
    // SAFETY: q < MAX_QUEUE_VECTORS (callers index queues that `install` accepted); the
    // cells are plain memory the handlers write; volatile reads see each store. The count
    // is read first: its store follows the stamp's, so the stamp is at least as new.
    unsafe {
        let base = (&raw const irq_cells as *const u64).add(q * CELL_STRIDE);
        let count = core::ptr::read_volatile(base);
        let tsc = core::ptr::read_volatile(base.add(1));
        (count, tsc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gate_splits_handler_address_into_three_fields() {
        let g = gate(0x1234_5678_9abc_def0, GATE_INTR_DPL3);
        assert_eq!(g[0] & 0xffff, 0xdef0);
        assert_eq!((g[0] >> 16) & 0xffff, u64::from(crate::boot::KERNEL_CS));
        assert_eq!((g[0] >> 32) & 0xff, 0, "IST 0");
        assert_eq!((g[0] >> 40) & 0xff, 0xee);
        assert_eq!(g[0] >> 48, 0x9abc);
        assert_eq!(g[1], 0x1234_5678);
    }

    #[test]
    fn test_gate_type_present_dpl_bits() {
        for (t, dpl) in [(GATE_INTR_DPL0, 0), (GATE_INTR_DPL3, 3)] {
            assert_eq!(t & 0x80, 0x80, "present");
            assert_eq!((t >> 5) & 3, dpl);
            assert_eq!(t & 0xf, 0xe, "64-bit interrupt gate");
        }
    }

    #[test]
    fn test_vectors_fit_below_spurious() {
        assert!(usize::from(VECTOR_BASE) + MAX_QUEUE_VECTORS <= usize::from(SPURIOUS_VECTOR));
        assert!(usize::from(VECTOR_BASE) >= 32, "not an exception vector");
    }
}
