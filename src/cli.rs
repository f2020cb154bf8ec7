//! Command line (clap derive only; validation lives in `config`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// ringvm: a KVM virtual machine monitor for I/O performance labs.
#[derive(Parser, Debug)]
#[command(name = "ringvm", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest kernel and run it until it exits.
    Run(RunArgs),
    /// Run the embedded blkbench guest against a disk and print IOPS and latency percentiles
    /// from the guest's view next to the host reactors' histograms.
    Bench(BenchArgs),
    /// Render the HTML latency report from a series JSON file (what perf/compare --report
    /// writes; format in README "Latency report (HTML)").
    Report(ReportArgs),
    /// Serve a disk to another VMM (QEMU, Cloud Hypervisor) as a vhost-user-blk back end whose
    /// queues are served by ringvm's pinned io_uring reactors.
    VhostUserBlk(VhostUserBlkArgs),
    /// Talk to a running ringvm through its --api-socket.
    Ctl(CtlArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The series JSON to render.
    #[arg(long)]
    pub input: PathBuf,
    /// The HTML file to write (one self-contained page: inline SVG, no scripts).
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct VhostUserBlkArgs {
    /// Unix socket to listen on (QEMU: -chardev socket,path=PATH; a stale socket is replaced).
    #[arg(long)]
    pub socket: PathBuf,
    /// The disk, with the syntax and options of `ringvm run --disk` (path=IMG[,queues=N][,reactors=I,J][,backend=uring|null][,poll-us=N]…); queues= is the most the front end may use.
    #[arg(long)]
    pub disk: String,
    /// Host cores that run an io_uring reactor thread each (e.g. 1,2). Default: the last core.
    #[arg(long, value_delimiter = ',')]
    pub io_cores: Option<Vec<usize>>,
    /// Use a kernel submission-queue polling thread (IORING_SETUP_SQPOLL) in every reactor.
    #[arg(long, default_value_t = false)]
    pub sqpoll: bool,
    /// Write the per-queue statistics as JSON to this file at exit.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Write an HdrHistogram interval log of the per-queue latencies to this file at exit.
    #[arg(long)]
    pub hlog: Option<PathBuf>,
    /// Exit after the first front end disconnects (for scripts that start one back end per VM).
    #[arg(long, default_value_t = false)]
    pub once: bool,
    /// seccomp filters of the reactors and the vhost-user control thread: on (a forbidden
    /// call stops the back end), log (the kernel logs it), off.
    #[arg(long, default_value = "on")]
    pub seccomp: String,
}

#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// The socket given to `ringvm run|bench --api-socket`.
    #[arg(long)]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub action: CtlAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum CtlAction {
    /// Configuration, state, uptime and cores of the VM (GET /vm), as JSON.
    Vm,
    /// Per-queue statistics as of now (GET /stats), as the exit report's table.
    Stats {
        /// Print the JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The Prometheus exposition (GET /metrics).
    Metrics {
        /// Scrape again every this many milliseconds on one kept-alive connection (a steady
        /// scraper: deadlines do not drift), printing each answer, until --count or the VM
        /// ends; then a summary of the answer times on stderr.
        #[arg(long, value_name = "MS")]
        every_ms: Option<f64>,
        /// With --every-ms: stop after this many scrapes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Close the current statistics interval and start a new one (PUT /stats/interval).
    Interval,
    /// Change a device's polling window live: `set disk=ID poll-us=N` or `set net=ID poll-us=N`.
    Set {
        /// `disk=ID` or `net=ID`, then `poll-us=N`.
        #[arg(required = true, num_args = 2)]
        assignments: Vec<String>,
    },
    /// Stop the VM in order, as SIGTERM does (PUT /vm/stop).
    Stop,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Disk to benchmark (file or block device). Default: a sparse RAM-backed file in /dev/shm, deleted afterwards, so the result measures the VMM, not a host disk.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Size of the default RAM-backed disk.
    #[arg(long, default_value = "1G")]
    pub disk_size: String,
    /// Workload: randread, randwrite, read, write or randrw. Giving any of --rw/--bs/--qd/--queues runs that single job instead of the default matrix (4k randread QD1, 4k randread QD32, 4k randwrite QD32, 128k read QD8).
    #[arg(long)]
    pub rw: Option<String>,
    /// Block size in bytes (k suffix allowed) [default: 4k].
    #[arg(long)]
    pub bs: Option<String>,
    /// Requests in flight per queue [default: 1].
    #[arg(long)]
    pub qd: Option<u32>,
    /// Number of virtqueues the guest drives [default: 1].
    #[arg(long)]
    pub queues: Option<u32>,
    /// Seconds each job measures (after a 0.5 s ramp).
    #[arg(long, default_value_t = 3.0)]
    pub runtime: f64,
    /// Back end: uring (io_uring on the disk) or null (no I/O: measures the VMM alone).
    #[arg(long, default_value = "uring")]
    pub backend: String,
    /// O_DIRECT on the disk: on or off (falls back to buffered where unsupported, e.g. tmpfs).
    #[arg(long, default_value = "on")]
    pub direct: String,
    /// After activity, busy-poll the avail rings for this many µs before sleeping (0 = off). The default matches QEMU's IOThread adaptive polling (poll-max-ns 32768).
    #[arg(long, default_value_t = 32)]
    pub poll_us: u64,
    /// Guest writes stamp every block and reads check them (fails the job on a mismatch).
    #[arg(long, default_value_t = false)]
    pub verify: bool,
    /// How blkbench learns of completions: off (it polls the used rings), on (blkbench irq=1: each queue's MSI-X vector into a minimal ring-0 handler, ring 3 waits for its flag) or both (every job twice, polled then with interrupts, side by side). `--irq` alone means on.
    #[arg(long, value_enum, default_value_t = IrqMode::Off, default_missing_value = "on", num_args = 0..=1)]
    pub irq: IrqMode,
    /// Write the full results (guest and host histograms) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an HTML latency report to this file: the guest's latency by percentile, IOPS per second and where the median request's time goes (implies --iops-log).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Have blkbench print its I/O count every second (progress=1; a few serial bytes a second) and keep the per-second IOPS in --json ("iops_per_s") and --report.
    #[arg(long, default_value_t = false)]
    pub iops_log: bool,
    /// Guest kernel to use instead of the embedded blkbench (a blkbench ELF built elsewhere).
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Run each job with fio inside the Linux guest of guests/linux (kernel + initramfs from guests/linux/build.sh) instead of blkbench; one boot per job.
    #[arg(long, default_value_t = false)]
    pub linux: bool,
    /// Where guests/linux/build.sh wrote vmlinux and initramfs.cpio (for --linux).
    #[arg(long, default_value = "guests/linux/out")]
    pub linux_dir: PathBuf,
    /// Also append the guest's console to this file as it arrives (to follow a long Linux boot).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// `ringvm bench --irq`: how blkbench learns of completions.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    /// Poll the used rings (no interrupts).
    Off,
    /// MSI-X interrupts (blkbench irq=1).
    On,
    /// Every job twice: polled, then with interrupts.
    Both,
}

/// Options shared by every command that starts a VM.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest memory size, with an optional K/M/G suffix [default: 512M for run, 128M for bench].
    #[arg(long)]
    pub memory: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Host cores the vCPU threads are pinned to, one per vCPU (e.g. 0,1).
    /// Default: one core each from core 0 up, leaving the last core(s) to the I/O reactors when there are enough.
    #[arg(long, value_delimiter = ',')]
    pub vcpu_affinity: Option<Vec<usize>>,
    /// Host cores that run an io_uring reactor thread each (e.g. 1,2).
    /// Default: the first core no vCPU is pinned to, else the last core.
    #[arg(long, value_delimiter = ',')]
    pub io_cores: Option<Vec<usize>>,
    /// Guest memory backing: none (4 KiB pages), thp (transparent hugepages, madvise), 2M or 1G (hugetlb; reserve with scripts/setup-hugepages.sh).
    #[arg(long, default_value = "thp")]
    pub hugepages: String,
    /// Populate all guest memory before the guest starts.
    #[arg(long, default_value_t = false)]
    pub prefault: bool,
    /// Let the kernel's KSM merge identical guest pages across VMs (madvise MADV_MERGEABLE, as QEMU's mem-merge); needs --hugepages none or thp, and KSM running (/sys/kernel/mm/ksm/run = 1).
    #[arg(long, default_value_t = false)]
    pub memory_merge: bool,
    /// Serial console output: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// Use a kernel submission-queue polling thread (IORING_SETUP_SQPOLL) in every reactor.
    #[arg(long, default_value_t = false)]
    pub sqpoll: bool,
    /// Write the per-queue statistics as JSON to this file at exit.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Write an HdrHistogram interval log of the per-queue latencies to this file, plus the guest's latency histogram (tag `guest`) when the guest is blkbench.
    #[arg(long)]
    pub hlog: Option<PathBuf>,
    /// Serve the control plane (HTTP/1.1 + JSON, Prometheus /metrics) on this Unix socket, mode 0600; see `ringvm ctl` and README "Control plane".
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Core for the control-plane thread [default: a core with no vCPU or reactor, else the first reactor's core].
    #[arg(long, value_name = "CORE")]
    pub api_core: Option<usize>,
    /// Mask (-name) or add (+name) CPUID feature bits for every vCPU, e.g. -cx16.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub cpu_features: Vec<String>,
    /// Seccomp filters on every thread: on (a call outside a thread's list stops ringvm with a message naming it), log (allowed, logged by the kernel) or off (also lifts the io_uring ring restriction).
    #[arg(long, default_value = "on")]
    pub seccomp: String,
    /// Where virtio-pci BARs go: low (32-bit BARs below 4 GiB) or high (64-bit BARs in a window above guest RAM, reported in the DSDT).
    #[arg(long, default_value = "low")]
    pub pci_bars: String,
    /// Base of the 64-bit BAR window (implies --pci-bars high), e.g. 256G; 1 GiB aligned, above guest RAM [default: the first GiB boundary above RAM and 4 GiB].
    #[arg(long)]
    pub pci_mmio64_base: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Guest kernel: a PVH ELF, a vmlinux ELF or a bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk, handed to the guest as PVH module 0 or through boot_params.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// A virtio-blk disk: path=IMG[,queues=N][,queue-size=N][,reactors=I,J][,readonly][,direct=on|off][,backend=uring|null][,poll-us=N][,size=BYTES (null backend)][,id=SERIAL][,lock=on|off (QEMU-compatible image locking, default on)]. Repeatable.
    #[arg(long)]
    pub disk: Vec<String>,
    /// A virtio-net device on a tap (opened, or created with CAP_NET_ADMIN): tap=NAME[,mac=52:54:00:12:34:56][,queues=N (pairs)][,queue-size=N][,reactors=I,J][,poll-us=N][,mtu=N]. Repeatable.
    #[arg(long)]
    pub net: Vec<String>,
    #[command(flatten)]
    pub vm: VmArgs,
}
