//! Shared bare-metal runtime for the ringvm guests: PVH boot to ring 3,
//! console, exit port, cmdline, PCI, virtio-pci (modern) and benchmarking
//! helpers. Everything after the boot stub runs in ring 3.
#![cfg_attr(not(test), no_std)]

pub mod apic;
pub mod arch;
pub mod bench;
pub mod boot;
pub mod cmdline;
pub mod exit;
pub mod hist;
pub mod irq;
pub mod json;
pub mod mem;
pub mod msix;
pub mod netproto;
pub mod pci;
pub mod rng;
pub mod serial;
pub mod start_info;
pub mod tsc;
pub mod virtio;

/// Exit code for a guest panic (a bug in the guest, not in the device).
pub const EXIT_PANIC: u32 = 6;

/// TSC when ring-3 Rust code started; with `boot::entry_tsc()` this times ring 0.
pub static RING3_ENTRY_TSC: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Defines the ring-3 entry point: `entry!(main)` with `fn main(&StartInfo) -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "C" fn guest_main(start_info: u64) -> ! {
            $crate::RING3_ENTRY_TSC.store($crate::arch::rdtsc(), core::sync::atomic::Ordering::Relaxed);
            let si = $crate::start_info::StartInfo::read(start_info);
            $main(&si)
        }
    };
}

/// The precompiled `core` refers to the unwinding personality even with
/// panic=abort; LTO drops the reference in release builds, debug builds need
/// the symbol. It is never called: nothing unwinds.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("panic: {}", info);
    exit::exit(EXIT_PANIC)
}
