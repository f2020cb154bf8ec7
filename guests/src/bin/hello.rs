//! ringvm's integration-test guest: proves PVH boot, ring 3, serial, the
//! memory map and each way a VM can end (exit port, triple fault, halt,
//! i8042 reset, or never).
#![no_std]
#![no_main]

use ringvm_guests::start_info::StartInfo;
use ringvm_guests::{cmdline, entry, exit, println};

entry!(main);

/// Asks the boot stub to halt in ring 0 when the cmdline holds `mode=halt`.
#[no_mangle]
#[used]
static guest_ring0_halt_opt_in: u8 = 1;

/// Asks the boot stub to run one `lock cmpxchg16b` in ring 0 (see guests/src/boot.rs).
#[no_mangle]
#[used]
static guest_ring0_cx16_opt_in: u8 = 1;

/// Asks the boot stub to set up `syscall` into ring 0 (see guests/src/boot.rs).
#[no_mangle]
#[used]
static guest_syscall_opt_in: u8 = 1;

extern "C" {
    static ring0_cx16_cell: [u64; 3];
    static syscall_cell: [u64; 4];
}

/// One `syscall` into the boot stub's ring-0 entry, which records what it saw and
/// `sysretq`s; returns (CS, CR3, RFLAGS in the handler, R11 as SYSCALL saved it).
fn syscall_round_trip() -> [u64; 4] {
    // SAFETY: the boot stub's syscall entry touches only syscall_cell and returns with
    // sysretq to the next instruction; SYSCALL clobbers RCX and R11.
    unsafe { core::arch::asm!("syscall", out("rcx") _, out("r11") _, out("rax") _, out("rdi") _) };
    // SAFETY: written by the ring-0 entry just now; plain memory.
    unsafe { core::ptr::read_volatile(&raw const syscall_cell) }
}

fn main(si: &StartInfo) -> ! {
    let cmd = si.cmdline();
    println!("ringvm-hello: ring3 ok");
    // SAFETY: written once by the boot stub before ring 3 started; read-only from here.
    let cell = unsafe { core::ptr::read_volatile(&raw const ring0_cx16_cell) };
    let swapped = cell[2] & 0xff == 1 && cell[0] == 0x1122_3344_5566_7788 && cell[1] == 0x99aa_bbcc_ddee_ff00;
    println!("ring0 cmpxchg16b: {}", if swapped { "swapped" } else { "WRONG" });
    println!("cmdline: {}", cmd);
    println!("memmap: {} entries, {} MiB", si.memmap_entries, si.ram_bytes() >> 20);
    let code = cmdline::get(cmd, "exit").and_then(cmdline::parse_u64).unwrap_or(0) as u32;
    let mode = cmdline::get(cmd, "mode").unwrap_or("exit");
    if mode != "exit" {
        println!("mode: {}", mode);
    }
    match mode {
        "syscall" => {
            let [cs, cr3, rflags, r11] = syscall_round_trip();
            println!(
                "syscall: ring {} (cs {cs:#x}, cr3 {cr3:#x}, rflags {rflags:#x}, user rflags {r11:#x}), sysret ok",
                cs & 3
            );
            println!("bye");
            exit::exit(code)
        }
        "triple" => exit::triple_fault(),
        // The boot stub halts in ring 0 before we get here; ring 3 cannot `hlt`.
        "halt" => exit::triple_fault(),
        "reset" => exit::i8042_reset(),
        "spin" => loop {
            core::hint::spin_loop();
        },
        _ => {
            println!("bye");
            exit::exit(code)
        }
    }
}
