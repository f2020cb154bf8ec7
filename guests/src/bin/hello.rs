//! ringvm's integration-test guest: proves PVH boot, ring 3, serial, the
//! memory map and each way a VM can end (exit port, triple fault, halt,
//! i8042 reset, ACPI power-off, or never).
#![no_std]
#![no_main]

use ringvm_guests::arch::{mmio, outb};
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

/// Exit code when `mode=poweroff` finds no way to power off, or the write did not stop the VM.
const POWEROFF_FAILED: u32 = 9;

fn read64(addr: u64) -> u64 {
    u64::from(mmio::read32(addr)) | u64::from(mmio::read32(addr + 4)) << 32
}

/// Finds the table with `sig` among the XSDT's entries (tables and entries are 4-byte
/// aligned as ringvm lays them out).
fn xsdt_find(xsdt: u64, sig: &[u8; 4]) -> Option<u64> {
    let len = u64::from(mmio::read32(xsdt + 4));
    let entries = len.saturating_sub(36) / 8;
    (0..entries.min(64))
        .map(|i| read64(xsdt + 36 + 8 * i))
        .find(|&at| at != 0 && at < 1 << 32 && mmio::read32(at) == u32::from_le_bytes(*sig))
}

/// SLP_TYPa from the DSDT's `\_S5` package: `_S5_`, PackageOp, PkgLength, NumElements,
/// then the first element (Zero, One, or BytePrefix and a byte).
fn dsdt_s5_type(dsdt: u64) -> Option<u8> {
    let len = u64::from(mmio::read32(dsdt + 4)).min(1 << 20);
    // Byte by byte: AML names sit at any alignment.
    let at = (dsdt + 36..dsdt + len.saturating_sub(8)).find(|&a| {
        b"_S5_\x12".iter().zip(a..).all(|(&b, x)| mmio::read8(x) == b)
    })?;
    // PkgLength: bits 7..6 of the lead byte count the bytes that follow it.
    let lead = mmio::read8(at + 5);
    let elem = at + 5 + 1 + u64::from(lead >> 6) + 1;
    match mmio::read8(elem) {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a => Some(mmio::read8(elem + 1)),
        _ => None,
    }
}

/// Powers off as Linux does on a hardware-reduced ACPI platform: RSDP (from the PVH start
/// info) → XSDT → FADT's SLEEP_CONTROL_REG, SLP_TYP from the DSDT's `\_S5`, then
/// `SLP_TYP << 2 | SLP_EN` written to that register. Returns why it could not.
fn acpi_poweroff(si: &StartInfo) -> &'static str {
    let rsdp = read64(si.paddr + 32);
    if rsdp == 0 || rsdp >= 1 << 32 || read64(rsdp) != u64::from_le_bytes(*b"RSD PTR ") {
        return "no RSDP in the start info";
    }
    let xsdt = read64(rsdp + 24);
    if xsdt == 0 || xsdt >= 1 << 32 || mmio::read32(xsdt) != u32::from_le_bytes(*b"XSDT") {
        return "no XSDT";
    }
    let Some(fadt) = xsdt_find(xsdt, b"FACP") else {
        return "no FADT";
    };
    // SLEEP_CONTROL_REG is the GAS at offset 244 (FADT revision 5 and later).
    if mmio::read32(fadt + 4) < 256 {
        return "FADT too short for SLEEP_CONTROL_REG";
    }
    if mmio::read8(fadt + 244) != 1 || mmio::read8(fadt + 245) != 8 {
        return "SLEEP_CONTROL_REG is not a byte in I/O space";
    }
    let port = read64(fadt + 248);
    if port == 0 || port > 0xffff {
        return "SLEEP_CONTROL_REG has no port";
    }
    let dsdt = read64(fadt + 140);
    if dsdt == 0 || dsdt >= 1 << 32 || mmio::read32(dsdt) != u32::from_le_bytes(*b"DSDT") {
        return "no DSDT";
    }
    let Some(typ) = dsdt_s5_type(dsdt) else {
        return "no \\_S5 package in the DSDT";
    };
    println!("acpi: sleep control port {:#x}, S5 sleep type {}", port, typ);
    outb(port as u16, ((typ << 2) & 0x1c) | 0x20);
    for _ in 0..1_000_000 {
        core::hint::spin_loop();
    }
    "the sleep control register did not stop the VM"
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
        "poweroff" => {
            let why = acpi_poweroff(si);
            println!("poweroff failed: {}", why);
            exit::exit(POWEROFF_FAILED)
        }
        "spin" => loop {
            core::hint::spin_loop();
        },
        _ => {
            println!("bye");
            exit::exit(code)
        }
    }
}
