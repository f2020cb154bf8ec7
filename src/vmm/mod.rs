//! Assembling and running a VM.

pub mod exit;
pub mod thread;
