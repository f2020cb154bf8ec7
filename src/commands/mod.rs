//! The CLI's commands (the only place `anyhow` is used).

mod bench;
mod ctl;
mod report;
mod vhost;
pub use bench::bench;
pub use ctl::ctl;
pub use report::report;
pub use vhost::vhost_user_blk;

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use ringvm::api::ApiServer;
use ringvm::cli::RunArgs;
use ringvm::config::VmConfig;
use ringvm::device_manager::StandardDevices;
use ringvm::devices::legacy::serial::SerialOut;
use ringvm::vmm::exit::ExitReason;
use ringvm::vmm::vm::{self, DeviceContext, VmError, VmExtension};

/// blkbench's result line starts with this.
const RESULT_PREFIX: &[u8] = b"{\"blkbench\":";
/// Longest result line kept (a full histogram is ~100 KB); a longer line is dropped.
const RESULT_MAX: usize = 4 << 20;

/// Passes the guest's console through to `--serial` and keeps the last blkbench result
/// line, so `--hlog` can add the guest's histogram.
struct ResultTap {
    inner: Option<SerialOut>,
    line: Vec<u8>,
    /// The current line is not a result line.
    skip: bool,
    found: Arc<Mutex<Option<String>>>,
}

impl Write for ResultTap {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(o) = self.inner.as_mut() {
            o.write_all(b)?;
        }
        for &c in b {
            if c == b'\n' {
                if !self.skip && self.line.starts_with(RESULT_PREFIX) {
                    let l = String::from_utf8_lossy(&self.line).into_owned();
                    *self.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(l);
                }
                self.line.clear();
                self.skip = false;
            } else if self.skip {
            } else if self.line.len() < RESULT_MAX
                && (self.line.len() >= RESULT_PREFIX.len() || RESULT_PREFIX[self.line.len()] == c)
            {
                self.line.push(c);
            } else {
                // Not a result line (or an oversized one): ignore the rest of it.
                self.line.clear();
                self.skip = true;
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.as_mut().map_or(Ok(()), |o| o.flush())
    }
}

/// `ringvm run`'s devices, plus the result tap when `--hlog` is given.
struct RunVm {
    devices: StandardDevices,
    tap: Option<ResultTap>,
}

impl VmExtension for RunVm {
    fn attach(&mut self, ctx: &mut DeviceContext) -> Result<(), VmError> {
        self.devices.attach(ctx)
    }
    fn serial_out(&mut self) -> Option<SerialOut> {
        self.tap.take().map(|t| Box::new(t) as SerialOut)
    }
    fn on_report_signal(&mut self) {
        self.devices.on_report_signal()
    }
    fn on_stop(&mut self) {
        self.devices.on_stop()
    }
}

/// `ringvm run`: boot the guest, forward its console, exit with its status; print the
/// per-queue statistics when the VM had disks.
pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let config = VmConfig::from_args(args)?;
    let api = start_api(&args.vm, "run", &config)?;
    let found = Arc::new(Mutex::new(None));
    let tap = match &config.hlog {
        Some(_) => Some(ResultTap {
            inner: vm::serial_out(&config.serial)?,
            line: Vec::new(),
            skip: false,
            found: found.clone(),
        }),
        None => None,
    };
    let mut devices = StandardDevices::default();
    devices.api = api.as_ref().map(|a| a.hook(config.hlog.clone()));
    let mut ext = RunVm { devices, tap };
    let outcome = vm::run(&config, &mut ext).context("VM failed")?;
    let devices = ext.devices;
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
        // PUT /stats/interval, the last at stop); without it, one interval at exit, with the
        // guest's own histogram beside the host's when the guest is blkbench.
        if let (Some(p), None) = (&config.hlog, &api) {
            let line = found.lock().unwrap_or_else(|e| e.into_inner()).take();
            let guest = line
                .and_then(|l| ringvm::bench::result::parse_guest(&l).ok())
                .and_then(|g| g.histogram());
            match guest {
                Some(g) => report.write_hlog_with(p, &[("guest", &g)])?,
                None => report.write_hlog(p)?,
            }
        }
    }
    Ok(outcome.reason.status() as u8)
}

/// Starts the control plane on `--api-socket`, if given, pinned to `--api-core`, else to
/// a core that neither a vCPU nor a reactor is pinned to, else to the first reactor's core:
/// on the 2-core nested lab host every wake-up on a vCPU's core costs the guest several
/// times its own CPU time (the vCPU leaves guest mode), while the reactor's core switches
/// threads hundreds of thousands of times a second anyway; with the API (and the scraper)
/// there, 100 scrapes a second cost ≤ 1 % at QD1 and QD32 (perf/RESULTS.md, "Control plane").
pub(crate) fn start_api(
    vm: &ringvm::cli::VmArgs,
    command: &'static str,
    config: &VmConfig,
) -> anyhow::Result<Option<ApiServer>> {
    let Some(path) = vm.api_socket.as_deref() else {
        return Ok(None);
    };
    let cores = ringvm::config::host_cores();
    if let Some(c) = vm.api_core.filter(|c| !cores.contains(c)) {
        anyhow::bail!("--api-core {c}: no such core on this host (cores: {cores:?})");
    }
    let free = cores
        .into_iter()
        .find(|c| !config.vcpu_cores.contains(c) && !config.io_cores.contains(c));
    let core = vm.api_core.or(free).or(config.io_cores.first().copied());
    Ok(Some(ApiServer::start(path, command, core, config.seccomp)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap() -> (ResultTap, Arc<Mutex<Option<String>>>) {
        let found = Arc::new(Mutex::new(None));
        let t = ResultTap {
            inner: None,
            line: Vec::new(),
            skip: false,
            found: found.clone(),
        };
        (t, found)
    }

    #[test]
    fn test_result_tap_keeps_only_the_result_line_bytewise() {
        let (mut t, found) = tap();
        for b in b"boot {\"x\":1}\nxx{\"blkbench\":1}\n{\"blkbench\":1,\"ios\":2}\nbye\n" {
            t.write_all(&[*b]).unwrap();
        }
        let got = found.lock().unwrap().clone();
        assert_eq!(got.as_deref(), Some("{\"blkbench\":1,\"ios\":2}"));
    }

    #[test]
    fn test_result_tap_no_result_line_finds_nothing() {
        let (mut t, found) = tap();
        t.write_all(b"{\"blkbenc\n{\"blk\"\n").unwrap();
        assert!(found.lock().unwrap().is_none());
    }
}
