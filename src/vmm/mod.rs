//! Assembling and running a VM.

pub mod bus;
pub mod cpuid;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod thread;
pub mod vcpu;
