//! Workarounds for one host: this lab's nested **PVM** KVM (the `kvm_pvm` module,
//! "Pagetable-based Virtual Machine", a paravirtual KVM that runs inside a cloud VM without
//! hardware nesting). It runs guest ring 3 natively and emulates guest ring 0 (about a
//! million instructions a second), and its emulator has gaps that a hardware KVM host
//! does not have. Everything ringvm does only because of that host lives here, and none
//! of it is active elsewhere: [`is_pvm_host`] gates each piece.
//!
//! - [`emulate`]: the instructions the host's ring-0 emulator refuses (`int3`,
//!   `cmpxchg16b`, `clac`/`stac`, `fwait`), decoded from KVM_EXIT_INTERNAL_ERROR;
//! - [`vcpu`]: the vCPU's side: completing those instructions on the guest's registers and
//!   memory, and keeping the `syscall` trap planted;
//! - [`syscall_trap`]: finishing guest user-mode `syscall`, which the host leaves half done;
//! - [`REFUSED_CPU_FEATURES`]: CPUID bits hidden from the guest because the emulator
//!   refuses their instructions in ring 0.
//!
//! The boot code's `pvm_quirks` (kernel command-line additions for Linux guests) is set
//! from [`is_pvm_host`] too; see `boot::BootSpec`.

pub mod emulate;
pub mod syscall_trap;
pub mod vcpu;

use super::cpuid::{FeatureBit, FEATURE_CX16, FEATURE_SMAP};

/// True on this lab's nested paravirtual KVM (the `kvm_pvm` module), where guest ring 0 is
/// emulated and some instructions need ringvm's help.
pub fn is_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// CPU features hidden from the guest on this host because its ring-0 emulator refuses
/// their instructions; `--cpu-features +name` keeps one.
pub const REFUSED_CPU_FEATURES: [(&str, FeatureBit); 2] =
    [("cx16", FEATURE_CX16), ("smap", FEATURE_SMAP)];
