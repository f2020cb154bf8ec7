//! PVH entry, the 32→64-bit switch and the drop to ring 3.
//!
//! Ring 0 is emulated at about a million instructions a second on the lab
//! hosts, so it does only what the CPU needs: load the static GDT, page tables
//! and TSS built at assembly time, patch the two descriptors whose fields
//! split an address, and `iretq` to ring 3. Everything else, .bss zeroing
//! included, runs natively in ring 3.
//!
//! Memory map of the image (see `link.ld`): everything identity mapped,
//! 0–4 GiB in 2 MiB pages, User + Writable, MMIO hole (≥ 3 GiB) uncached.


/// Kernel code selector (64-bit, DPL 0). The GDT follows Linux's layout, which the lab
/// host's PVM requires of MSR_STAR (SYSRET's user CS must be 0x33).
pub const KERNEL_CS: u16 = 0x10;
/// User data selector (DPL 3), used with RPL 3.
pub const USER_DS: u16 = 0x28;
/// User code selector (64-bit, DPL 3), used with RPL 3.
pub const USER_CS: u16 = 0x30;

#[cfg(not(test))]
core::arch::global_asm!(
    r#"
    .set KERNEL_CS, 0x10
    .set KERNEL_DS, 0x18
    .set USER32_CS, 0x20            /* SYSRET: user SS = this + 8, user CS = this + 16 */
    .set USER_DS,   0x28
    .set USER_CS,   0x30
    .set TSS_SEL,   0x40
    .set KERNEL_ALIAS, 0xffffffff80000000   /* supervisor-only alias of 0-1 GiB */
    .set TSS_LIMIT, 104 + 8192      /* header + I/O bitmap; the 0xff byte is at the limit */
    .set RING0_STACK_SIZE, 4096
    .set RING3_STACK_SIZE, 256 * 1024

    /* XEN_ELFNOTE_PHYS32_ENTRY: where a PVH loader enters, 32-bit protected mode. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start
pvh_start:
    /* EBX = hvm_start_info; paging off, flat segments, ESP undefined (0). */
    rdtsc
    movl %eax, guest_entry_tsc
    movl %edx, guest_entry_tsc + 4
    movl %ebx, guest_start_info

    /* A guest that defines guest_ring0_halt_opt_in (link.ld makes it 0 otherwise)
       halts here in ring 0 when the cmdline holds "mode=halt": ring 3 cannot
       hlt, and this host does not run call gates. */
    movl $guest_ring0_halt_opt_in, %eax
    testl %eax, %eax
    jz 3f
    cmpl $0x336ec578, (%ebx)
    jne 3f
    movl 24(%ebx), %esi
    testl %esi, %esi
    jz 3f
2:  cmpl $0x65646f6d, (%esi)        /* "mode" */
    jne 4f
    cmpl $0x6c61683d, 4(%esi)       /* "=hal" */
    jne 4f
    cmpb $0x74, 8(%esi)             /* "t" */
    jne 4f
    movb 9(%esi), %al
    testb $0xdf, %al                /* NUL or space ends the token */
    jz ring0_halt
4:  cmpb $0, (%esi)
    je 3f
    incl %esi
    jmp 2b
3:

    /* TSS descriptor: base 0..23 / 24..31 split around the access byte. */
    movl $guest_tss, %eax
    movl %eax, %edx
    shll $16, %edx
    orl $TSS_LIMIT, %edx
    movl %edx, gdt_tss
    movl %eax, %edx
    shrl $16, %edx
    movl %edx, %ecx
    andl $0xff, %ecx
    andl $0xff00, %edx
    shll $16, %edx
    orl %ecx, %edx
    orl $0x8900, %edx       /* present, 64-bit TSS (available) */
    movl %edx, gdt_tss + 4

    lgdt gdt_ptr
    lidt idt_null           /* no IDT: any exception is a triple fault */

    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax   /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx  /* EFER.LME */
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3)), %eax              /* clear EM, TS */
    orl $((1 << 31) | (1 << 1) | 1), %eax           /* PG, MP, PE */
    movl %eax, %cr0
    ljmp $KERNEL_CS, $long_mode

    .code64
long_mode:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $TSS_SEL, %eax
    ltr %ax
    movabsq $ring0_stack_top, %rsp

    /* A guest that defines guest_ring0_cx16_opt_in runs one `lock cmpxchg16b` in ring 0,
       which this lab host's emulator cannot execute: the VMM must complete it (ringvm
       does, see src/vmm/pvm_host/emulate.rs). Ring 3 reports the outcome (ring0_cx16_cell). */
    movabsq $guest_ring0_cx16_opt_in, %rax
    testq %rax, %rax
    jz 7f
    movabsq $ring0_cx16_cell, %rsi
    movq (%rsi), %rax
    movq 8(%rsi), %rdx
    movabsq $0x1122334455667788, %rbx
    movabsq $0x99aabbccddeeff00, %rcx
    lock cmpxchg16b (%rsi)
    setz 16(%rsi)
7:
    /* A guest that defines guest_syscall_opt_in lets ring 3 `syscall` into ring 0:
       EFER.SCE, STAR, LSTAR = syscall_entry and a #PF gate, both through the
       supervisor-only alias, so on this lab host the VMM must finish the syscall
       (ringvm does, see src/vmm/pvm_host/syscall_trap.rs). */
    movabsq $guest_syscall_opt_in, %rax
    testq %rax, %rax
    jz 8f
    movabsq $(pf_entry + KERNEL_ALIAS), %rax
    movabsq $idt_pf_gate, %rdi
    movw %ax, (%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    lidt idt_ptr
    movl $0xc0000080, %ecx          /* EFER.SCE */
    rdmsr
    orl $1, %eax
    wrmsr
    movl $0xc0000081, %ecx          /* STAR */
    xorl %eax, %eax
    movl $((USER32_CS << 16) | KERNEL_CS), %edx
    wrmsr
    movl $0xc0000082, %ecx          /* LSTAR */
    movabsq $(syscall_entry + KERNEL_ALIAS), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movl $0xc0000084, %ecx          /* FMASK: TF DF IF IOPL AC NT, as Linux */
    movl $0x47700, %eax
    xorl %edx, %edx
    wrmsr
8:
    /* A guest that defines guest_irq_opt_in gets the 256-entry IDT of guests/src/irq.rs:
       every gate empty (an interrupt or exception is still a triple fault) until ring 3
       fills the ones it uses; ring 3 turns interrupts on itself (irq::enable). */
    movabsq $guest_irq_opt_in, %rax
    testq %rax, %rax
    jz 11f
    lidt irq_idt_ptr
11:
    pushq $(USER_DS | 3)
    movabsq $ring3_stack_top, %rax
    pushq %rax
    pushq $0x3002           /* IOPL 3, IF 0 */
    pushq $(USER_CS | 3)
    movabsq $ring3_start, %rax
    pushq %rax
    iretq

    /* Reached through KERNEL_ALIAS only. SYSCALL entry: ring 0 on the user stack, RCX =
       return RIP, R11 = RFLAGS. Records CS and CR3 (a privileged read: #GP outside
       ring 0) and the RFLAGS it runs with in syscall_cell, then returns. */
syscall_entry:
    movabsq $syscall_cell, %rdi
    movw %cs, %ax
    movzwq %ax, %rax
    movq %rax, (%rdi)
    movq %cr3, %rax
    movq %rax, 8(%rdi)
    pushfq
    popq %rax
    movq %rax, 16(%rdi)
    movq %r11, 24(%rdi)
    sysretq

    /* #PF: the first instruction is a NOP form the VMM may plant its trap over. Any
       page fault that gets past it is reported and ends the VM (exit code 0x50). */
pf_entry:
    .byte 0x0f, 0x1f, 0x00
    movabsq $pf_msg, %rsi
    movw $0x3f8, %dx
9:  lodsb
    testb %al, %al
    jz 10f
    outb %al, %dx
    jmp 9b
10: movl $0x50, %eax
    outl %eax, $0xf4
    lidt idt_null
    ud2
pf_msg:
    .asciz "ringvm-guest: page fault in ring 0 (an unfinished syscall?)\n"

    .code32
ring0_halt:
    movl $halt_msg, %esi
    movw $0x3f8, %dx
5:  lodsb
    testb %al, %al
    jz 6f
    outb %al, %dx
    jmp 5b
6:  cli
    hlt
    jmp 6b
halt_msg:
    .asciz "ringvm-guest: ring0 halt\n"

    .data
    .balign 16
    .global ring0_cx16_cell
ring0_cx16_cell:
    .quad 0x0123456789abcdef, 0xfedcba9876543210
    .byte 0                 /* ZF after the cmpxchg16b */
    .balign 16
    .global syscall_cell
syscall_cell:
    .quad 0, 0, 0, 0        /* CS, CR3, RFLAGS in the handler; R11 (user RFLAGS) */
    .text

    .code64

    .text
    /* Ring 3 from here on: native speed. */
ring3_start:
    cld
    movabsq $__bss_start, %rdi
    movabsq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movq guest_start_info(%rip), %rdi
    call guest_main
    ud2

    .section .data.boot, "aw", @progbits
    .balign 4096
    .globl boot_pml4            /* mem::map_mmio adds BARs above 4 GiB from ring 3 */
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 510, 8, 0
    .quad boot_pdpt_hi + 0x3    /* KERNEL_ALIAS: no User bit, so supervisor-only */
boot_pdpt_hi:
    .fill 510, 8, 0
    .quad boot_pd + 0x3         /* 0xffffffff80000000 -> 0-1 GiB */
    .quad 0
boot_pdpt:
    .quad boot_pd + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    /* 2 MiB pages: present, writable, user, PS; the top GiB (MMIO) also PWT|PCD. */
    .set pd_addr, 0
    .rept 1536
    .quad pd_addr + 0x87
    .set pd_addr, pd_addr + 0x200000
    .endr
    .rept 512
    .quad pd_addr + 0x9f
    .set pd_addr, pd_addr + 0x200000
    .endr

    .balign 16
guest_gdt:
    .quad 0, 0
    .quad 0x00af9a000000ffff    /* 0x10 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x18 kernel data */
    .quad 0x00cffa000000ffff    /* 0x20 user code, 32-bit, DPL 3 (unused; STAR base) */
    .quad 0x00cff2000000ffff    /* 0x28 user data, DPL 3 */
    .quad 0x00affa000000ffff    /* 0x30 user code, 64-bit, DPL 3 */
    .quad 0
gdt_tss:
    .quad 0, 0                  /* 0x40 TSS, filled at entry */
gdt_end:

    .balign 8
gdt_ptr:
    .word gdt_end - guest_gdt - 1
    .quad guest_gdt
idt_null:
    .word 0
    .quad 0
idt_ptr:
    .word 15 * 16 - 1
    .quad guest_idt

    /* Only #PF (vector 14) is present, for guest_syscall_opt_in. */
    .balign 16
guest_idt:
    .fill 14 * 16, 1, 0
idt_pf_gate:
    .word 0, KERNEL_CS          /* offset 0..15 filled at entry */
    .byte 0, 0x8e               /* present, DPL 0, interrupt gate */
    .word 0                     /* offset 16..31 */
    .long 0, 0                  /* offset 32..63, reserved */

    .global guest_start_info
    .global guest_entry_tsc
    .balign 8
guest_start_info:
    .quad 0
guest_entry_tsc:
    .quad 0

    /* 64-bit TSS with an all-zero I/O permission bitmap: this host ignores
       IOPL, so ring-3 port I/O needs the bitmap to allow every port. */
    .balign 16
guest_tss:
    .long 0
    .quad ring0_stack_top       /* RSP0: the stack of interrupts taken in ring 3 (irq.rs) */
    .quad 0, 0                  /* RSP1, RSP2 */
    .quad 0                     /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0   /* IST1-7 */
    .quad 0                     /* reserved */
    .word 0                     /* reserved */
    .word 104                   /* I/O map base */
    .fill 8192, 1, 0            /* every port allowed */
    .byte 0xff                  /* bitmap terminator */

    .section .bss.boot_stacks, "aw", @nobits
    .balign 4096
    .skip RING0_STACK_SIZE
ring0_stack_top:
    .skip RING3_STACK_SIZE
ring3_stack_top:
"#,
    options(att_syntax)
);

#[cfg(not(test))]
extern "C" {
    /// TSC at the PVH entry point, for measuring the ring-0 start-up time.
    static guest_entry_tsc: u64;
}

/// TSC value read by the first instruction of the PVH entry.
#[cfg(not(test))]
pub fn entry_tsc() -> u64 {
    // SAFETY: written once by the boot stub before ring 3 starts; read-only after.
    unsafe { core::ptr::read_volatile(&raw const guest_entry_tsc) }
}

/// Host unit tests run no boot stub.
#[cfg(test)]
pub fn entry_tsc() -> u64 {
    0
}
