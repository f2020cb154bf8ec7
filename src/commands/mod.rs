//! The CLI's commands (the only place `anyhow` is used).

mod bench;
mod ctl;
pub use bench::bench;
pub use ctl::ctl;

use anyhow::Context;
use ringvm::api::ApiServer;
use ringvm::cli::RunArgs;
use ringvm::config::VmConfig;
use ringvm::vmm::devices::StandardDevices;
use ringvm::vmm::exit::ExitReason;
use ringvm::vmm::vm;

/// `ringvm run`: boot the guest, forward its console, exit with its status; print the
/// per-queue statistics when the VM had disks.
pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let config = VmConfig::from_args(args)?;
    let api = start_api(args.vm.api_socket.as_deref(), "run", &config)?;
    let mut devices = StandardDevices::default();
    devices.api = api.as_ref().map(|a| a.hook(config.hlog.clone()));
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
        // With the API, the VM wrote its interval log as it went (one interval per
        // PUT /stats/interval, the last at stop).
        if let (Some(p), None) = (&config.hlog, &api) {
            report.write_hlog(p)?;
        }
    }
    Ok(outcome.reason.status() as u8)
}

/// Starts the control plane on `path`, if given. Its thread goes on a core that neither a
/// vCPU nor a reactor is pinned to, else on the first vCPU's core: a reactor's core is
/// never shared with it, and a vCPU loses only the few microseconds a request costs.
pub(crate) fn start_api(
    path: Option<&std::path::Path>,
    command: &'static str,
    config: &VmConfig,
) -> anyhow::Result<Option<ApiServer>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let free = ringvm::config::host_cores()
        .into_iter()
        .find(|c| !config.vcpu_cores.contains(c) && !config.io_cores.contains(c));
    let core = free.or(config.vcpu_cores.first().copied());
    Ok(Some(ApiServer::start(path, command, core)?))
}
