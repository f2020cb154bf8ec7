//! `ringvm bench`: boots the embedded blkbench guest once per job and prints the guest's
//! latency percentiles next to the host reactors' histograms.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ringvm::bench::result::{
    self, JobResult, GUEST_BAD_PARAM, GUEST_DEVICE_ERROR, GUEST_NO_DEVICE, GUEST_OK, GUEST_VERIFY,
};
use ringvm::bench::{fio, GuestResult, Job, Rw};
use ringvm::boot::KernelImage;
use ringvm::cli::{BenchArgs, IrqMode};
use ringvm::config::{parse_size, VmConfig};
use ringvm::device_manager::StandardDevices;
use ringvm::devices::legacy::serial::SerialOut;
use ringvm::devices::virtio::block::DiskConfig;
use ringvm::vmm::exit::ExitReason;
use ringvm::vmm::vm::{self, DeviceContext, VmError, VmExtension, TICK_MS};

/// Removes the default RAM-backed disk when the bench ends: on success, on an error, on a
/// panic (unwinding), and on SIGINT/SIGTERM, which `main` blocks so they only stop the VM
/// (see vmm::signals::block). Only SIGKILL leaves it behind.
struct TempDisk(PathBuf);
impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The guest's console: kept for the result, and appended to `--console-log` if given.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>, Option<Arc<File>>);
impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        if let Some(mut f) = self.1.as_deref() {
            let _ = f.write_all(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct BenchVm {
    devices: StandardDevices,
    console: Console,
    label: String,
    progress: bool,
    ticks: u64,
    last: (Instant, u64),
}

impl VmExtension for BenchVm {
    fn attach(&mut self, ctx: &mut DeviceContext) -> Result<(), VmError> {
        self.devices.attach(ctx)
    }
    fn serial_out(&mut self) -> Option<SerialOut> {
        Some(Box::new(self.console.clone()))
    }
    fn on_report_signal(&mut self) {
        self.devices.on_report_signal()
    }
    fn on_tick(&mut self) {
        self.ticks += 1;
        if !self.progress || self.ticks % (1000 / TICK_MS).max(1) != 0 {
            return;
        }
        // Borrowed, not copied: a copy a second would mean megabytes mapped and unmapped.
        let summary = |r: &ringvm::metrics::Report| {
            let p99 = r
                .queues
                .iter()
                .map(|q| {
                    if q.kick_to_complete.is_empty() {
                        0
                    } else {
                        q.kick_to_complete.value_at_quantile(0.99)
                    }
                })
                .max()
                .unwrap_or(0);
            (r.total_requests(), p99)
        };
        let Some(Ok((reqs, p99))) = self
            .devices
            .pool()
            .map(|p| p.snapshot_with(Duration::ZERO, summary))
        else {
            return;
        };
        let now = Instant::now();
        let iops =
            (reqs - self.last.1.min(reqs)) as f64 / now.duration_since(self.last.0).as_secs_f64();
        self.last = (now, reqs);
        eprint!(
            "\r{:<22} {:>10.0} IOPS   host k2c p99 {:>8.1} µs   ",
            self.label,
            iops,
            p99 as f64 / 1000.0
        );
    }
    fn on_stop(&mut self) {
        if self.progress {
            eprint!("\r{:80}\r", "");
        }
        self.devices.on_stop()
    }
}

/// Holds an exclusive lock per pinned core so two benches never share cores unknowingly.
struct CoreLocks(#[allow(dead_code)] Vec<File>);

fn lock_cores(cores: &[usize]) -> anyhow::Result<CoreLocks> {
    let dir = Path::new("/tmp/ringvm-cores");
    std::fs::create_dir_all(dir).context("Cannot create /tmp/ringvm-cores")?;
    let mut held = Vec::new();
    let mut sorted = cores.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for c in sorted {
        let path = dir.join(format!("core{c}.lock"));
        let f = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("Cannot open {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; LOCK_NB never blocks.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            bail!("Core {c} is already pinned by another ringvm bench (pid {}); pick other cores with --vcpu-affinity/--io-cores", owner.trim());
        }
        let mut fw = &f;
        let _ = fw.write_all(format!("{}\n", std::process::id()).as_bytes());
        held.push(f);
    }
    Ok(CoreLocks(held))
}

fn jobs(args: &BenchArgs) -> anyhow::Result<Vec<Job>> {
    let single =
        args.rw.is_some() || args.bs.is_some() || args.qd.is_some() || args.queues.is_some();
    if args.runtime <= 0.0 || !args.runtime.is_finite() {
        bail!(
            "Invalid --runtime {}: must be a positive number of seconds",
            args.runtime
        );
    }
    let mut list = if single {
        let rw: Rw = args
            .rw
            .as_deref()
            .unwrap_or("randread")
            .parse()
            .map_err(anyhow::Error::msg)?;
        let bs = parse_size(args.bs.as_deref().unwrap_or("4k"))?;
        if bs == 0 || bs % 512 != 0 {
            bail!("Invalid --bs {bs}: must be a non-zero multiple of 512");
        }
        let qd = args.qd.unwrap_or(1);
        if qd == 0 {
            bail!("Invalid --qd 0: at least 1");
        }
        let queues = args.queues.unwrap_or(1);
        if queues == 0 {
            bail!("Invalid --queues 0: at least 1");
        }
        vec![Job {
            rw,
            bs,
            qd,
            queues,
            runtime_s: args.runtime,
            ramp_s: 0.5,
            verify: false,
            irq: false,
        }]
    } else {
        Job::default_matrix(args.runtime)
    };
    for j in &mut list {
        j.verify = args.verify;
    }
    if args.linux && args.irq != IrqMode::Off {
        bail!("--irq is blkbench's switch; fio in the Linux guest always completes by interrupt");
    }
    Ok(with_irq(args.irq, list))
}

/// The jobs to run under `--irq`: as given, all with interrupts, or each polled then with
/// interrupts, next to each other.
fn with_irq(mode: IrqMode, list: Vec<Job>) -> Vec<Job> {
    match mode {
        IrqMode::Off => list,
        IrqMode::On => list.into_iter().map(|j| Job { irq: true, ..j }).collect(),
        IrqMode::Both => list
            .into_iter()
            .flat_map(|j| [j.clone(), Job { irq: true, ..j }])
            .collect(),
    }
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": kernel.trim(),
        "cpu": cpu,
    })
}

fn guest_failure(code: u32, console: &str) -> String {
    let last = console
        .lines()
        .rev()
        .find(|l| !l.starts_with('{'))
        .unwrap_or("")
        .trim();
    let what = match code {
        GUEST_NO_DEVICE => "found no virtio-blk device",
        GUEST_DEVICE_ERROR => "saw a device error",
        GUEST_VERIFY => "found a verify mismatch",
        GUEST_BAD_PARAM => "rejected the job",
        _ => "failed",
    };
    format!("blkbench {what} (exit code {code}): {last}")
}

/// The guest that runs the jobs.
enum Guest {
    /// blkbench (embedded and loaded from memory, or `--guest`).
    Blkbench(KernelImage),
    /// fio in the Linux guest (`--linux`).
    Linux { kernel: PathBuf, initrd: PathBuf },
}

impl Guest {
    fn choose(args: &BenchArgs) -> anyhow::Result<Guest> {
        if !args.linux {
            let kernel = match &args.guest {
                Some(p) => KernelImage::File(p.clone()),
                None => KernelImage::Embedded {
                    name: "blkbench",
                    elf: ringvm::guests::BLKBENCH,
                },
            };
            return Ok(Guest::Blkbench(kernel));
        }
        if args.verify {
            bail!(
                "--verify is blkbench's (stamped blocks); fio in the Linux guest does not run it"
            );
        }
        let dir = &args.linux_dir;
        let kernel = args.guest.clone().unwrap_or_else(|| dir.join("vmlinux"));
        let initrd = dir.join("initramfs.cpio");
        for f in [&kernel, &initrd] {
            if !f.is_file() {
                bail!(
                    "No Linux guest file {}: build it with guests/linux/build.sh, or point --linux-dir at its output",
                    f.display()
                );
            }
        }
        if ringvm::vmm::pvm_host::is_pvm_host() {
            eprintln!("ringvm: nested PVM host: guest ring 0 is emulated here, so each Linux boot takes 25-50 minutes and each request in the guest about a second: use --runtime 30 or more (see README, Linux guests)");
        }
        Ok(Guest::Linux { kernel, initrd })
    }

    fn kernel(&self) -> KernelImage {
        match self {
            Guest::Blkbench(k) => k.clone(),
            Guest::Linux { kernel, .. } => KernelImage::File(kernel.clone()),
        }
    }

    fn initrd(&self) -> Option<PathBuf> {
        match self {
            Guest::Blkbench(_) => None,
            Guest::Linux { initrd, .. } => Some(initrd.clone()),
        }
    }

    fn cmdline(&self, job: &Job, progress: bool) -> String {
        match self {
            Guest::Blkbench(_) if progress => format!("{} progress=1", job.cmdline()),
            Guest::Blkbench(_) => job.cmdline(),
            Guest::Linux { .. } => fio::cmdline(job),
        }
    }

    fn memory(&self) -> &'static str {
        match self {
            Guest::Blkbench(_) => ringvm::config::BENCH_MEMORY,
            Guest::Linux { .. } => "512M",
        }
    }

    /// The guest's result, or why there is none.
    fn result(&self, reason: &ExitReason, console: &str) -> anyhow::Result<GuestResult> {
        match (self, reason) {
            (Guest::Blkbench(_), ExitReason::DebugExit { code: GUEST_OK })
            // The Linux guest's /init reboots (reboot=k: an i8042 reset) when fio succeeded;
            // a `poweroff` (ACPI S5) is as orderly.
            | (Guest::Linux { .. }, ExitReason::Reset | ExitReason::PowerOff) => {}
            (Guest::Blkbench(_), ExitReason::DebugExit { code }) => {
                bail!("{}", guest_failure(*code, console))
            }
            (Guest::Linux { .. }, other) => {
                let tail: Vec<&str> = console.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("Linux guest stopped: {}; console ends: {}", other.describe(), tail.join(" | "))
            }
            (_, other) => bail!("VM stopped: {}", other.describe()),
        }
        Ok(match self {
            Guest::Blkbench(_) => result::parse_guest(console)?,
            Guest::Linux { .. } => fio::parse(console)?,
        })
    }
}

/// `ringvm bench`.
pub fn bench(args: &BenchArgs) -> anyhow::Result<u8> {
    let jobs = jobs(args)?;
    let _temp;
    let (disk_path, size) = match &args.disk {
        Some(p) => (p.clone(), None),
        None => {
            let size = parse_size(&args.disk_size)?;
            let p = PathBuf::from(format!("/dev/shm/ringvm-bench-{}.img", std::process::id()));
            let f = File::create(&p)
                .with_context(|| format!("Cannot create the default disk {}", p.display()))?;
            _temp = TempDisk(p.clone());
            f.set_len(size)
                .with_context(|| format!("Cannot size the default disk {}", p.display()))?;
            (p, Some(size))
        }
    };
    let target = Guest::choose(args)?;
    let console_log = match &args.console_log {
        Some(p) => Some(Arc::new(
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("Cannot open --console-log {}", p.display()))?,
        )),
        None => None,
    };
    let progress = std::env::var_os("RINGVM_NO_PROGRESS").is_none() && {
        // SAFETY: isatty only inspects the descriptor.
        unsafe { libc::isatty(2) == 1 }
    };
    let mut results: Vec<JobResult> = Vec::new();
    let mut failure = None;
    let mut interrupted = None;
    let mut locks = None;
    let mut placement = (Vec::new(), Vec::new());
    let mut api = None;
    for job in &jobs {
        if !results.is_empty() {
            // Each job's start-up is timed from its own start, not the process's.
            vm::mark_job_start();
        }
        let backend = match args.backend.as_str() {
            "null" => format!("backend=null,size={}", size.unwrap_or(1 << 30)),
            "uring" => format!(
                "path={},backend=uring,direct={}",
                disk_path.display(),
                args.direct
            ),
            other => bail!("Invalid --backend '{other}': expected uring or null"),
        };
        let spec = format!("{backend},queues={},poll-us={}", job.queues, args.poll_us);
        let disk: DiskConfig = spec
            .parse()
            .map_err(|e| anyhow::anyhow!("Invalid disk '{spec}': {e}"))?;
        let mut vm_args = args.vm.clone();
        vm_args
            .memory
            .get_or_insert_with(|| target.memory().to_string());
        let config = VmConfig::build(
            target.kernel(),
            target.initrd(),
            target.cmdline(job, args.iops_log || args.report.is_some()),
            vec![disk],
            &vm_args,
        )?;
        placement = (config.vcpu_cores.clone(), config.io_cores.clone());
        if locks.is_none() {
            let mut cores = config.vcpu_cores.clone();
            cores.extend(&config.io_cores);
            locks = Some(lock_cores(&cores)?);
        }
        if api.is_none() {
            // One socket for the whole run: each job's VM joins it in turn.
            api = super::start_api(&args.vm, "bench", &config)?;
        }
        let hlog_path = args.vm.hlog.as_ref().map(|hlog| {
            if jobs.len() == 1 {
                hlog.clone()
            } else {
                hlog.with_extension(format!("{}.hlog", results.len() + 1))
            }
        });
        let mut devices = StandardDevices::default();
        devices.api = api.as_ref().map(|a| a.hook(hlog_path.clone()));
        let mut ext = BenchVm {
            devices,
            console: Console(Arc::default(), console_log.clone()),
            label: job.label(),
            progress,
            ticks: 0,
            last: (Instant::now(), 0),
        };
        let outcome = match vm::run(&config, &mut ext) {
            Ok(o) => o,
            Err(e) => {
                failure =
                    Some(anyhow::Error::new(e).context(format!("Job {} failed", job.label())));
                break;
            }
        };
        if let ExitReason::Signal { signal } = outcome.reason {
            // Stopped in order by SIGINT/SIGTERM: the jobs that finished are reported.
            interrupted = Some((signal, job.label()));
            break;
        }
        if outcome.reason == ExitReason::ApiStop {
            // PUT /vm/stop: the same orderly stop as SIGTERM.
            interrupted = Some((libc::SIGTERM, job.label()));
            break;
        }
        let console =
            String::from_utf8_lossy(&ext.console.0.lock().unwrap_or_else(|e| e.into_inner()))
                .into_owned();
        let guest = match target.result(&outcome.reason, &console) {
            Ok(g) => g,
            Err(e) => {
                failure = Some(e.context(format!("Job {}", job.label())));
                break;
            }
        };
        let host = ext.devices.report.take().unwrap_or_default();
        // With the API, the VM wrote its interval log as it went.
        if let (Some(path), None) = (&hlog_path, &api) {
            match guest.histogram() {
                Some(g) => host.write_hlog_with(path, &[("guest", &g)])?,
                None => host.write_hlog(path)?,
            }
        }
        results.push(JobResult {
            job: job.clone(),
            guest,
            host,
            vmm_startup_ns: outcome.startup.as_nanos() as u64,
        });
    }
    if !results.is_empty() {
        print!("{}", result::table(&results));
        let first: Vec<String> = results
            .iter()
            .filter_map(|r| r.first_io_ns())
            .map(|n| format!("{:.1}", n as f64 / 1e6))
            .collect();
        if !first.is_empty() {
            println!(
                "start to first guest I/O (ms, per job; VMM start-up + guest init): {}",
                first.join(", ")
            );
        }
        if args.linux {
            println!("guest latency: fio's lat_ns (submit to complete) in the Linux guest");
        }
        println!(
            "disk: {}{}  backend: {}  vCPU cores {:?}  I/O cores {:?}",
            disk_path.display(),
            if size.is_some() { " (RAM-backed)" } else { "" },
            args.backend,
            placement.0,
            placement.1
        );
    }
    if let Some(p) = &args.json {
        std::fs::write(p, result::to_json(&results, &machine()))
            .with_context(|| format!("Cannot write {}", p.display()))?;
    }
    if let (Some(p), false) = (&args.report, results.is_empty()) {
        let mut meta = super::report::common_meta();
        meta.push((
            "disk".into(),
            format!(
                "{}{}, backend {}, vCPU cores {:?}, I/O cores {:?}",
                disk_path.display(),
                if size.is_some() { " (RAM-backed)" } else { "" },
                args.backend,
                placement.0,
                placement.1
            ),
        ));
        let guest = if args.linux {
            "fio in the Linux guest (lat_ns, submit to complete)"
        } else {
            "blkbench (TSC-timed, submit to used-ring completion)"
        };
        meta.push(("guest latency".into(), guest.into()));
        let doc = ringvm::report::from_jobs("ringvm bench", meta, &results);
        super::report::write(p, &doc)?;
        println!("report: {}", p.display());
    }
    if let Some((signal, label)) = interrupted {
        eprintln!("ringvm: interrupted by signal {signal} during job {label}");
        return Ok(ExitReason::Signal { signal }.status() as u8);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser;

    fn bench_args(extra: &[&str]) -> BenchArgs {
        let argv = ["ringvm", "bench"].iter().chain(extra);
        match ringvm::cli::Cli::try_parse_from(argv).unwrap().command {
            ringvm::cli::Command::Bench(b) => b,
            other => panic!("not bench: {other:?}"),
        }
    }

    #[test]
    fn test_irq_both_runs_each_job_polled_then_with_interrupts() {
        let m = Job::default_matrix(3.0);
        let both = jobs(&bench_args(&["--irq", "both"])).unwrap();
        assert_eq!(both.len(), 2 * m.len());
        for (pair, j) in both.chunks(2).zip(&m) {
            assert_eq!(pair[0], *j);
            assert_eq!(
                pair[1],
                Job {
                    irq: true,
                    ..j.clone()
                }
            );
        }
        let on = jobs(&bench_args(&["--irq"])).unwrap();
        assert!(on.iter().all(|j| j.irq) && on.len() == m.len());
        assert_eq!(jobs(&bench_args(&[])).unwrap(), m);
    }

    #[test]
    fn test_irq_bad_value_or_with_linux_is_refused() {
        let argv = ["ringvm", "bench", "--irq", "sometimes"];
        let e = ringvm::cli::Cli::try_parse_from(argv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes") && e.contains("both"), "{e}");
        let e = jobs(&bench_args(&["--linux", "--irq", "on"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--irq is blkbench's"), "{e}");
    }
}
