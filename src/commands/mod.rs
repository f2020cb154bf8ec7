//! The CLI's commands (the only place `anyhow` is used).

use anyhow::Context;
use ringvm::cli::RunArgs;
use ringvm::config::VmConfig;
use ringvm::vmm::vm::{self, DeviceContext, VmError, VmExtension};

struct NoDevices;
impl VmExtension for NoDevices {
    fn attach(&mut self, _ctx: &mut DeviceContext) -> Result<(), VmError> {
        Ok(())
    }
}

/// `ringvm run`: boot the guest, forward its console, exit with its status.
pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let config = VmConfig::from_args(args)?;
    let outcome = vm::run(&config, &mut NoDevices).context("VM failed")?;
    let status = outcome.reason.status();
    if !matches!(outcome.reason, ringvm::vmm::exit::ExitReason::DebugExit { .. }) || std::env::var_os("RINGVM_VERBOSE").is_some() {
        eprintln!("ringvm: {} after {:.3} s", outcome.reason.describe(), outcome.guest_time.as_secs_f64());
    }
    Ok(status as u8)
}
