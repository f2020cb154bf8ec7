//! Building a VM from a validated [`VmConfig`] and running it to completion.

use std::fs::File;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{Bus, BusDevice};
use super::exit::{ExitHandle, ExitReason};
use super::irq::IrqRouter;
use super::layout::{
    KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, PCI_ECAM_BUS0_SIZE, PCI_ECAM_START, SERIAL_IRQ,
};
use super::pvm_host::{self, syscall_trap::SyscallTrap};
use super::vcpu::{self, EntryPoint, VcpuRunner, VcpuShared};
use super::{cpuid, kvm, memory, thread};
use crate::boot::{self, BootSpec};
use crate::config::{cpu_feature, SerialMode, VmConfig};
use crate::devices::legacy::{
    acpi_sleep, cmos, debug_exit, i8042, serial, AcpiSleep, Cmos, DebugExit, Serial, I8042,
};
use crate::devices::pci::root::{self, PciConfigIo, PciConfigMmio};
use crate::devices::pci::{PciError, PciRoot};
use crate::devices::virtio::pci::{VirtioPci, VirtioPciError};
use crate::devices::virtio::{GuestMemory, VirtioDevice};
use crate::seccomp::{self, ThreadFilter, ThreadKind};

/// How often the main thread looks for vCPUs halted with interrupts off.
const HALT_CHECK_MS: u64 = 250;
/// Period of [`VmExtension::on_tick`].
pub const TICK_MS: u64 = HALT_CHECK_MS;
/// How long a stopping vCPU may take to leave KVM_RUN before ringvm gives up on it.
const VCPU_STOP_TIMEOUT_MS: u64 = 2000;

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error("--vcpus {asked} is more than KVM allows ({max})")]
    TooManyVcpus { asked: u32, max: usize },
    #[error("Failed to create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("Failed to set up the VM: {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Irq(#[from] super::irq::IrqError),
    #[error(transparent)]
    Thread(#[from] thread::ThreadError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("Cannot open serial output file {path}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to place a device on the I/O or MMIO bus")]
    Bus(#[from] super::bus::BusError),
    #[error("Failed to create the virtio-pci function of a device")]
    VirtioPci(#[from] VirtioPciError),
    #[error("Failed to plug a device into PCI bus 0")]
    Pci(#[from] PciError),
    /// A [`VmExtension`] could not attach its devices: the extension's own typed error (the
    /// device manager's), which this module does not name.
    #[error("Failed to set up devices")]
    Attach(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    #[error("I/O error setting up the VM")]
    Io(#[from] std::io::Error),
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunOutcome {
    pub reason: ExitReason,
    /// Wall time from the first KVM_RUN to the stop request.
    pub guest_time: Duration,
    /// From process start (see [`mark_process_start`]) to the vCPUs' first KVM_RUN: the
    /// VMM's share of "start to the guest's first I/O".
    pub startup: Duration,
}

static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

static JOB_START: Mutex<Option<Instant>> = Mutex::new(None);

/// Records when the process started; `main` calls it first thing.
pub fn mark_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

/// Times the next VM's start-up from now instead of from process start (a bench running
/// several VMs in one process).
pub fn mark_job_start() {
    *JOB_START.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
}

fn start_reference(now: Instant) -> Instant {
    let job = JOB_START.lock().unwrap_or_else(|e| e.into_inner()).take();
    job.unwrap_or_else(|| *PROCESS_START.get_or_init(|| now))
}

/// Hooks that let a caller (the bench command, a device set) add devices and observe the
/// run without the VM module knowing about them.
pub trait VmExtension {
    /// Called once the VM, memory and buses exist, before the vCPUs start.
    fn attach(&mut self, ctx: &mut DeviceContext) -> Result<(), VmError>;
    /// Where the serial console goes instead of `--serial` (a bench capturing the guest's
    /// report); `None` keeps the configured output.
    fn serial_out(&mut self) -> Option<serial::SerialOut> {
        None
    }
    /// Called on SIGUSR1 from the main thread.
    fn on_report_signal(&mut self) {}
    /// Called from the main thread about every [`TICK_MS`] while the guest runs.
    fn on_tick(&mut self) {}
    /// Called after the vCPUs stopped.
    fn on_stop(&mut self) {}
}

/// What a device needs to plug itself into the VM.
pub struct DeviceContext<'a> {
    pub vm: &'a Arc<VmFd>,
    pub mem: &'a GuestMemory,
    pub pio: &'a Arc<Bus>,
    pub mmio: &'a Arc<Bus>,
    pub irq: &'a IrqRouter,
    pub exit: &'a ExitHandle,
    pub config: &'a VmConfig,
    pub pci: &'a Arc<Mutex<PciRoot>>,
}

impl DeviceContext<'_> {
    /// Plugs `device` into bus 0 behind a virtio-pci function; returns its slot.
    pub fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<usize, VmError> {
        let mut root = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        let t = VirtioPci::new(device, &mut root, self.irq.clone(), self.mem.clone())?;
        Ok(root.add(Arc::new(Mutex::new(t)))?)
    }
}

fn attach_pci(
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    mmio64: Option<(u64, u64)>,
) -> Result<Arc<Mutex<PciRoot>>, VmError> {
    let mut root = PciRoot::new(mmio);
    if let Some((start, size)) = mmio64 {
        root.set_mmio64_window(start, size);
    }
    let root = Arc::new(Mutex::new(root));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo(root.clone()))),
        root::CONFIG_IO_BASE,
        root::CONFIG_IO_SIZE,
    )
    .and_then(|_| {
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio(root.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_BUS0_SIZE,
        )
    })?;
    Ok(root)
}

/// The console output `--serial` asks for (`None` for `none`).
pub fn serial_out(mode: &SerialMode) -> Result<Option<serial::SerialOut>, VmError> {
    Ok(match mode {
        SerialMode::Stdio => Some(Box::new(std::io::stdout())),
        SerialMode::File(p) => Some(Box::new(File::create(p).map_err(|source| {
            VmError::SerialFile {
                path: p.clone(),
                source,
            }
        })?)),
        SerialMode::None => None,
    })
}

fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the VM
        // is dropped before the memory in `run`), and slots never overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| VmError::Setup {
            what: "guest memory slot",
            source,
        })?;
    }
    Ok(())
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Builds the VM described by `config`, runs it until it stops and returns why.
pub fn run(config: &VmConfig, ext: &mut dyn VmExtension) -> Result<RunOutcome, VmError> {
    // Block the stop/report signals before any thread exists so they all inherit the mask
    // and only the main thread's signalfd sees them.
    let sigs = super::signals::Signals::install();
    let kvm = kvm::open()?;
    let max = kvm::max_vcpus(&kvm);
    if config.vcpus as usize > max {
        return Err(VmError::TooManyVcpus {
            asked: config.vcpus,
            max,
        });
    }
    let exit = ExitHandle::new()?;
    let mem = memory::create(
        config.memory,
        config.hugepages,
        config.prefault,
        config.memory_merge,
    )?;
    let vm = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
    register_memory(&vm, &mem)?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(|source| VmError::Setup {
            what: "TSS address",
            source,
        })?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(|source| VmError::Setup {
            what: "identity map",
            source,
        })?;
    vm.create_irq_chip().map_err(|source| VmError::Setup {
        what: "in-kernel irqchip",
        source,
    })?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(|source| VmError::Setup {
        what: "PIT",
        source,
    })?;
    let irq = IrqRouter::new(vm.clone());
    irq.init()?;

    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let serial_override = ext.serial_out();
    let serial = attach_legacy(&vm, &pio, &exit, &config.serial, serial_override)?;
    let pci = attach_pci(&pio, &mmio, config.pci_mmio64)?;

    let entry = boot::load(
        &mem,
        &BootSpec {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &config.cmdline,
            mem_size: config.memory,
            vcpus: config.vcpus as u8,
            pvm_quirks: pvm_host::is_pvm_host(),
            tsc_khz: kvm::vm_tsc_khz(&vm),
            pci_mmio64: config.pci_mmio64,
        },
    )?;

    let mut ctx = DeviceContext {
        vm: &vm,
        mem: &mem,
        pio: &pio,
        mmio: &mmio,
        irq: &irq,
        exit: &exit,
        config,
        pci: &pci,
    };
    ext.attach(&mut ctx)?;

    let outcome = run_vcpus(
        &kvm,
        &vm,
        &mem,
        config,
        entry,
        &pio,
        &mmio,
        &exit,
        ext,
        sigs.as_ref(),
    );
    if let Some(s) = serial {
        s.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
    ext.on_stop();
    outcome
}

fn attach_legacy(
    vm: &VmFd,
    pio: &Arc<Bus>,
    exit: &ExitHandle,
    mode: &SerialMode,
    out: Option<serial::SerialOut>,
) -> Result<Option<Arc<Mutex<Serial>>>, VmError> {
    let add = |dev: Arc<Mutex<dyn BusDevice>>, base, len| pio.insert(dev, base, len);
    add(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        debug_exit::DEBUG_EXIT_PORT,
        debug_exit::DEBUG_EXIT_SIZE,
    )?;
    add(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        i8042::I8042_BASE,
        i8042::I8042_SIZE,
    )?;
    add(
        Arc::new(Mutex::new(AcpiSleep::new(exit.clone()))),
        acpi_sleep::ACPI_SLEEP_BASE,
        acpi_sleep::ACPI_SLEEP_SIZE,
    )?;
    add(
        Arc::new(Mutex::new(Cmos::default())),
        cmos::CMOS_BASE,
        cmos::CMOS_SIZE,
    )?;
    let out = match out {
        Some(o) => o,
        None => match serial_out(mode)? {
            Some(o) => o,
            None => return Ok(None),
        },
    };
    let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&irqfd, SERIAL_IRQ)
        .map_err(|source| VmError::Setup {
            what: "serial irqfd",
            source,
        })?;
    let serial = Arc::new(Mutex::new(Serial::new(irqfd, out)));
    add(serial.clone(), serial::SERIAL_PORT, serial::SERIAL_SIZE)?;
    Ok(Some(serial))
}

#[allow(clippy::too_many_arguments)]
fn run_vcpus(
    kvm: &Kvm,
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    config: &VmConfig,
    entry: EntryPoint,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    exit: &ExitHandle,
    ext: &mut dyn VmExtension,
    sigs: Option<&super::signals::Signals>,
) -> Result<RunOutcome, VmError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| VmError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Setup {
            what: "supported CPUID",
            source,
        })?;
    let mut masked: Vec<cpuid::FeatureBit> = config
        .cpu_features
        .iter()
        .filter(|(add, _)| !add)
        .filter_map(|(_, n)| cpu_feature(n))
        .collect();
    if pvm_host::is_pvm_host() {
        // Features whose instructions this host's ring-0 emulator refuses; `+name` keeps one.
        for (name, bit) in pvm_host::REFUSED_CPU_FEATURES {
            if !config.cpu_features.iter().any(|(add, n)| *add && n == name) {
                masked.push(bit);
            }
        }
    }

    // Only this host leaves user-mode `syscall` unfinished (see vmm::pvm_host::syscall_trap).
    let syscall_trap = pvm_host::is_pvm_host().then(|| Arc::new(SyscallTrap::new()));
    let mut runners = Vec::new();
    for id in 0..config.vcpus as u64 {
        let fd = vm
            .create_vcpu(id)
            .map_err(|source| vcpu::VcpuError::Create { id, source })?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let mut c = cpuid::for_vcpu(&base_cpuid, id as u32, config.vcpus, tsc_khz, &masked);
        for bit in config
            .cpu_features
            .iter()
            .filter(|(add, _)| *add)
            .filter_map(|(_, n)| cpu_feature(n))
        {
            cpuid::add(&mut c, bit);
        }
        fd.set_cpuid2(&c).map_err(|source| vcpu::VcpuError::Setup {
            id,
            what: "cpuid",
            source,
        })?;
        if id == 0 {
            vcpu::setup_boot_state(&fd, id, mem, entry)?;
        } else {
            vcpu::setup_ap_state(&fd, id)?;
        }
        runners.push(VcpuRunner {
            id: id as usize,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            shared: Arc::new(VcpuShared::default()),
            emulated: 0,
            mem: mem.clone(),
            syscall_trap: syscall_trap.clone(),
        });
    }

    let started = Instant::now();
    let startup = started.duration_since(start_reference(started));
    let mut threads = Vec::new();
    let filter = ThreadFilter::new(ThreadKind::Vcpu, config.seccomp)?;
    for r in runners {
        let shared = r.shared.clone();
        let core = config.vcpu_cores.get(r.id).copied();
        let name = format!("vcpu{}", r.id);
        let h = thread::spawn(&name, core, filter.clone(), exit.clone(), move || r.run())?;
        threads.push((h, shared));
    }
    // Set-up is done: from here the main thread waits, reports and tears down (and, in
    // `ringvm bench`, sets up the next job's VM under the same filter).
    if let Err(e) = seccomp::install_main(config.seccomp) {
        stop_vcpus(&threads);
        return Err(e.into());
    }

    let reason = wait_for_exit(exit, &threads, ext, sigs);
    let guest_time = started.elapsed();
    stop_vcpus(&threads);
    for (h, _) in threads {
        // A vCPU stuck in the kernel is left behind rather than hanging the VMM's exit.
        if h.is_finished() {
            let _ = h.join();
        }
    }
    Ok(RunOutcome {
        reason,
        guest_time,
        startup,
    })
}

type VcpuThread = (std::thread::JoinHandle<Option<()>>, Arc<VcpuShared>);

fn kick(threads: &[VcpuThread]) {
    for (h, _) in threads {
        if !h.is_finished() {
            // SAFETY: the pthread_t belongs to a thread we have not joined yet (checked just
            // above), and the signal has a handler installed, so it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
        }
    }
}

fn wait_for_exit(
    exit: &ExitHandle,
    threads: &[VcpuThread],
    ext: &mut dyn VmExtension,
    sigs: Option<&super::signals::Signals>,
) -> ExitReason {
    loop {
        if let Some(r) = exit.wait_timeout(Duration::from_millis(HALT_CHECK_MS)) {
            return r;
        }
        match sigs.and_then(|s| s.poll()) {
            Some(super::signals::Event::Stop(signal)) => {
                exit.request(ExitReason::Signal { signal })
            }
            Some(super::signals::Event::Report) => ext.on_report_signal(),
            None => {}
        }
        ext.on_tick();
        if threads
            .iter()
            .all(|(_, s)| s.dead_halted.load(Ordering::Acquire))
        {
            exit.request(ExitReason::AllHalted);
        }
        // Make every vCPU re-check whether it is halted with interrupts disabled.
        kick(threads);
    }
}

fn stop_vcpus(threads: &[VcpuThread]) {
    for (_, s) in threads {
        s.stop.store(true, Ordering::Release);
    }
    let deadline = Instant::now() + Duration::from_millis(VCPU_STOP_TIMEOUT_MS);
    while threads.iter().any(|(h, _)| !h.is_finished()) {
        if Instant::now() > deadline {
            log::error!("a vCPU did not leave KVM_RUN within {VCPU_STOP_TIMEOUT_MS} ms");
            let _ = std::io::stderr().flush();
            break;
        }
        kick(threads);
        std::thread::sleep(Duration::from_millis(1));
    }
}
