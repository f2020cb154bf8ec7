//! Assembling and running a VM.

pub mod bus;
pub mod cpuid;
pub mod exit;
pub mod irq;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod pvm_host;
pub mod signals;
pub mod thread;
pub mod vcpu;
pub mod vm;
