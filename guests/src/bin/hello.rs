//! ringvm's integration-test guest: proves PVH boot, ring 3, serial, the
//! memory map and each way a VM can end (exit port, triple fault, halt,
//! i8042 reset, or never).
#![no_std]
#![no_main]

use ringvm_guests::start_info::StartInfo;
use ringvm_guests::{arch, cmdline, entry, exit, println};

entry!(main);

fn main(si: &StartInfo) -> ! {
    let cmd = si.cmdline();
    println!("ringvm-hello: ring3 ok");
    println!("cmdline: {}", cmd);
    println!("memmap: {} entries, {} MiB", si.memmap_entries, si.ram_bytes() >> 20);
    let code = cmdline::get(cmd, "exit").and_then(cmdline::parse_u64).unwrap_or(0) as u32;
    let mode = cmdline::get(cmd, "mode").unwrap_or("exit");
    if mode != "exit" {
        println!("mode: {}", mode);
    }
    match mode {
        "triple" => exit::triple_fault(),
        "halt" => arch::ring0_halt(),
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
