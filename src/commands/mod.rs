//! The CLI's commands (the only place `anyhow` is used).

mod bench;
mod vhost;
pub use bench::bench;
pub use vhost::vhost_user_blk;

use anyhow::Context;
use ringvm::cli::RunArgs;
use ringvm::config::VmConfig;
use ringvm::vmm::devices::StandardDevices;
use ringvm::vmm::exit::ExitReason;
use ringvm::vmm::vm;

/// `ringvm run`: boot the guest, forward its console, exit with its status; print the
/// per-queue statistics when the VM had disks.
pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let config = VmConfig::from_args(args)?;
    let mut devices = StandardDevices::default();
    let outcome = vm::run(&config, &mut devices).context("VM failed")?;
    if !matches!(outcome.reason, ExitReason::DebugExit { .. })
        || std::env::var_os("RINGVM_VERBOSE").is_some()
    {
        eprintln!(
            "ringvm: {} after {:.3} s",
            outcome.reason.describe(),
            outcome.guest_time.as_secs_f64()
        );
    }
    if let Some(report) = &devices.report {
        eprint!("{}", report.table());
        if let Some(p) = &config.stats_json {
            std::fs::write(p, report.to_json())
                .with_context(|| format!("Cannot write {}", p.display()))?;
        }
        if let Some(p) = &config.hlog {
            report.write_hlog(p)?;
        }
    }
    Ok(outcome.reason.status() as u8)
}
