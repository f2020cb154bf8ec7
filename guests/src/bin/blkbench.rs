//! blkbench: a bare-metal virtio-blk benchmark. PVH boot, modern virtio-pci
//! driven from ring 3 by polling (or, with irq=1, by one MSI-X interrupt per queue
//! into a minimal ring-0 handler), per-request TSC latency into a log-linear
//! histogram, one JSON report line on the serial console. Runs unchanged
//! under QEMU, ringvm, Cloud Hypervisor and Firecracker (PCI only).
//!
//! Exit codes (isa-debug-exit port 0xf4): see the `EXIT_*` constants.
#![no_std]
#![no_main]

#[path = "blkbench/blkdev.rs"]
mod blkdev;
#[path = "blkbench/chaos.rs"]
mod chaos;
#[path = "blkbench/check.rs"]
mod check;
#[path = "blkbench/engine.rs"]
mod engine;
#[path = "blkbench/report.rs"]
mod report;

use engine::{Engine, Hists, Layout, RunError};
use ringvm_guests::bench::params::Params;
use ringvm_guests::hist::Histogram;
use ringvm_guests::msix::{Msix, MsixError};
use ringvm_guests::{apic, irq};
use ringvm_guests::start_info::{StartInfo, MEMMAP_MAX};
use ringvm_guests::tsc::{self, Clock, TscSource};
use ringvm_guests::virtio::blk::{self, BlkConfig, SECTOR_SIZE};
use ringvm_guests::virtio::pci::{TransportError, VirtioPci};
use ringvm_guests::virtio::queue::SplitQueue;
use ringvm_guests::virtio::{self as virtio, status};
use ringvm_guests::{entry, exit, println};

/// The run completed; no device errors, verify passed or off.
pub const EXIT_OK: u32 = 0;
/// No usable virtio-blk PCI device.
pub const EXIT_NO_DEVICE: u32 = 2;
/// The device failed: status != OK, refused setup, or stopped completing.
pub const EXIT_DEVICE_ERROR: u32 = 3;
/// verify=1 found data that does not match its stamp.
pub const EXIT_VERIFY: u32 = 4;
/// A parameter is malformed or impossible on this device/VM.
pub const EXIT_BAD_PARAM: u32 = 5;

const VIRTIO_BLK_MODERN: u16 = 0x1042;
const VIRTIO_BLK_TRANSITIONAL: u16 = 0x1001;


entry!(main);

/// Asks the boot stub for the interrupt IDT of guests/src/irq.rs (used with irq=1).
#[no_mangle]
#[used]
static guest_irq_opt_in: u8 = 1;

static mut HIST: Histogram = Histogram::new();
static mut IRQ_HANDLER_HIST: Histogram = Histogram::new();
static mut IRQ_WAKE_HIST: Histogram = Histogram::new();

fn bad_param(key: &str, value: &str, reason: &str) -> ! {
    println!("bad parameter: {}={}: {}", key, value, reason);
    exit::exit(EXIT_BAD_PARAM)
}

fn device_error(what: &str) -> ! {
    println!("device error: {}", what);
    exit::exit(EXIT_DEVICE_ERROR)
}

fn transport_error(e: TransportError) -> ! {
    match e {
        TransportError::NoModernCaps => {
            println!("no device: virtio-blk has no modern (virtio 1.0) capabilities");
            exit::exit(EXIT_NO_DEVICE)
        }
        TransportError::NoBarSpace => device_error("no room below 4 GiB for the device's BARs"),
        TransportError::BarUnmappable { addr, error } => {
            println!("device error: BAR at {:#x} cannot be mapped ({:?})", addr, error);
            exit::exit(EXIT_DEVICE_ERROR)
        }
        TransportError::ResetTimeout => device_error("reset did not complete"),
        TransportError::FeaturesRefused => device_error("FEATURES_OK refused"),
        TransportError::NoQueue(q) => {
            println!("device error: queue {} missing", q);
            exit::exit(EXIT_DEVICE_ERROR)
        }
        TransportError::VectorRefused(q) => {
            println!("device error: queue {} refused its MSI-X vector", q);
            exit::exit(EXIT_DEVICE_ERROR)
        }
    }
}

/// irq=1: the IDT gates, the local APIC (software-enabled, local interrupts and the
/// PICs masked) and one MSI-X entry per queue, pointed at this CPU's APIC. Interrupts stay
/// off until the queues are set up. Returns the APIC id.
fn setup_interrupts(func: ringvm_guests::pci::Function, queues: u16) -> Result<u8, &'static str> {
    irq::install(usize::from(queues)).map_err(|e| match e {
        irq::IrqError::TooManyQueues => "more queues than the 64 interrupt handlers",
        irq::IrqError::StubLayout => "the interrupt handlers are not 64 bytes apart (a build error)",
    })?;
    // The boot page tables identity-map 0-4 GiB; VirtioPci moved the device's BARs there.
    let msix = Msix::find(func, |_, end| end <= 1 << 32).map_err(|e| match e {
        MsixError::NoCapability => "the device has no MSI-X capability",
        MsixError::TableNotMapped => "the MSI-X table's BAR is unassigned or above 4 GiB",
        MsixError::TooFewVectors { .. } => "fewer MSI-X vectors than queues",
    })?;
    apic::mask_pics();
    let apic_id = apic::enable(irq::SPURIOUS_VECTOR);
    if !apic::is_enabled() {
        return Err("the local APIC did not enable (xAPIC MMIO at 0xfee00000)");
    }
    msix.enable(queues, apic::msi_address(apic_id), irq::VECTOR_BASE).map_err(|_| "fewer MSI-X vectors than queues")?;
    Ok(apic_id)
}

fn main(si: &StartInfo) -> ! {
    let cmd = si.cmdline();
    let p = match Params::parse(cmd) {
        Ok(p) => p,
        Err(e) => bad_param(e.key, e.value, e.reason),
    };
    let (khz, tsc_source) = match p.tsc_khz {
        Some(k) => (k, TscSource::Cmdline),
        None => tsc::khz_from_cpuid().unwrap_or_else(|| {
            println!("bad parameter: tsc_khz needed (CPUID leaves 0x15 and 0x40000010 give no TSC frequency)");
            exit::exit(EXIT_BAD_PARAM)
        }),
    };
    let clock = Clock { khz };
    let ring0_ns = clock.cycles_to_ns(
        ringvm_guests::RING3_ENTRY_TSC.load(core::sync::atomic::Ordering::Relaxed).wrapping_sub(ringvm_guests::boot::entry_tsc()),
    );

    let Some(func) = virtio::pci::find_device(VIRTIO_BLK_MODERN, VIRTIO_BLK_TRANSITIONAL) else {
        println!("no device: no virtio-blk PCI function on bus 0");
        exit::exit(EXIT_NO_DEVICE)
    };
    let mut reserved = [(0u64, 0u64); MEMMAP_MAX];
    for (r, m) in reserved.iter_mut().zip(&si.memmap[..si.memmap_entries]) {
        *r = (m.addr, m.addr.saturating_add(m.size));
    }
    let dev = VirtioPci::new_at(func, &reserved[..si.memmap_entries], p.bar64).unwrap_or_else(|e| transport_error(e));

    // Reset → ACKNOWLEDGE → DRIVER → FEATURES_OK → queues → DRIVER_OK.
    dev.reset().unwrap_or_else(|e| transport_error(e));
    dev.add_status(status::ACKNOWLEDGE);
    dev.add_status(status::DRIVER);
    let offered = dev.device_features();
    if offered & virtio::F_VERSION_1 == 0 {
        dev.add_status(status::FAILED);
        println!("no device: virtio-blk does not offer VERSION_1");
        exit::exit(EXIT_NO_DEVICE);
    }
    let features = offered & blk::DRIVER_FEATURES;
    dev.negotiate(features).unwrap_or_else(|e| transport_error(e));
    let cfg = BlkConfig::read(&dev, features);

    // The modes that are not a benchmark: one request at a time, their own report.
    if p.chaos || p.verify_only {
        let mut bump = ringvm_guests::mem::arena(si);
        let code = if p.chaos {
            chaos::run(&dev, features, cfg, clock, &mut bump)
        } else {
            check::run(&dev, features, cfg, clock, &p, &mut bump)
        };
        dev.reset().ok();
        exit::exit(code)
    }

    // Checks that need the device.
    let fail = |key, reason| -> ! {
        dev.add_status(status::FAILED);
        bad_param(key, ringvm_guests::cmdline::get(cmd, key).unwrap_or(""), reason)
    };
    if p.bs % u64::from(cfg.blk_size.max(512)) != 0 {
        fail("bs", "not a multiple of the device's blk_size");
    }
    if p.queues > cfg.num_queues.min(dev.num_queues()) {
        fail("queues", "more than the device offers");
    }
    let capacity = cfg.capacity_sectors * SECTOR_SIZE;
    let size = p.size.unwrap_or(capacity) / p.bs * p.bs;
    if p.size.is_some_and(|s| s > capacity) {
        fail("size", "larger than the disk");
    }
    if size == 0 {
        fail(if p.size.is_some() { "size" } else { "bs" }, "working set smaller than one block");
    }
    if p.rw.writes() && features & blk::F_RO != 0 {
        fail("rw", "device is read-only");
    }
    if p.flush_every != 0 && features & blk::F_FLUSH == 0 {
        fail("flush_every", "device does not offer FLUSH");
    }
    let max_size = dev.queue_max_size(0);
    let qsize = match p.qsize {
        Some(q) if q > max_size => fail("qsize", "larger than the device's queue size"),
        Some(q) => q,
        None => max_size,
    };
    if qsize == 0 || !qsize.is_power_of_two() {
        device_error("queue size is not a power of two");
    }
    let indirect = 3 * p.qd > u32::from(qsize);
    if p.qd > u32::from(qsize) || (indirect && features & virtio::F_INDIRECT_DESC == 0) {
        fail("qd", "more requests than the queue holds (3 descriptors each without INDIRECT_DESC)");
    }

    let mut bump = ringvm_guests::mem::arena(si);
    let need = u64::from(p.queues) * (u64::from(p.qd) * (p.bs.next_multiple_of(4096) + 96) + 3 * 4096 + 16 * u64::from(qsize));
    if need > bump.remaining() {
        fail("qd", "buffers (queues*qd*bs) do not fit in guest memory");
    }
    let event_idx = features & virtio::F_EVENT_IDX != 0;
    let apic_id = p.irq.then(|| setup_interrupts(func, p.queues).unwrap_or_else(|why| fail("irq", why)));
    let mut rings: [Option<SplitQueue>; 64] = [const { None }; 64];
    if usize::from(p.queues) > rings.len() {
        fail("queues", "more than 64");
    }
    for qi in 0..p.queues {
        let Some(mut q) = SplitQueue::alloc(&mut bump, qi, qsize, event_idx) else {
            fail("qsize", "rings do not fit in guest memory")
        };
        // With irq=1, MSI-X table entry qi (vector VECTOR_BASE + qi) is queue qi's.
        let vector = if p.irq { qi } else { virtio::pci::NO_VECTOR };
        let notify =
            dev.setup_queue_vector(qi, qsize, [q.desc, q.avail, q.used], vector).unwrap_or_else(|e| transport_error(e));
        q.set_notify_addr(notify);
        rings[usize::from(qi)] = Some(q);
    }
    // SAFETY: the histograms are only touched here, on the only thread.
    let hists = unsafe {
        Hists {
            lat: &mut *(&raw mut HIST),
            irq_handler: &mut *(&raw mut IRQ_HANDLER_HIST),
            irq_wake: &mut *(&raw mut IRQ_WAKE_HIST),
        }
    };
    let layout = Layout { indirect, size_bytes: size };
    let Some(mut engine) = Engine::new(p, clock, &mut rings, layout, &mut bump, hists) else {
        fail("qd", "buffers do not fit in guest memory")
    };
    if p.durable && !engine.verify_table {
        fail("durable", "the per-block table does not fit in guest memory (use a smaller size=)");
    }
    dev.add_status(status::DRIVER_OK);
    if dev.status() & (status::NEEDS_RESET | status::FAILED) != 0 {
        device_error("device needs reset after DRIVER_OK");
    }
    if p.irq {
        irq::enable();
        if !irq::enabled() {
            device_error("irq=1: RFLAGS.IF is still clear after the int3 that sets it");
        }
    }

    // Guest entry to the first submission: the guest's share of "start to first I/O".
    let first_io_ns = clock.cycles_to_ns(ringvm_guests::arch::rdtsc().wrapping_sub(ringvm_guests::boot::entry_tsc()));
    let result = engine.run();
    dev.reset().ok();
    // Printed after the run: each byte is a VM exit, which would delay the first I/O.
    println!(
        "blkbench: {:02x}:{:02x}.{} {} sectors blk_size {} queues {}/{} qsize {} features {:#x} cfg {:#x}{} tsc {} kHz ({}) ring0 {} us",
        func.bus, func.dev, func.func, cfg.capacity_sectors, cfg.blk_size, p.queues, cfg.num_queues, qsize,
        features, dev.common, if dev.relocated { " (BAR moved by the driver)" } else { "" }, khz, tsc_source.name(), ring0_ns / 1000
    );

    if let Err(RunError::Timeout) = result {
        let waiting = engine.completions_waiting();
        if p.irq && waiting > 0 {
            println!("device error: timeout: {} completions in the used rings, no interrupt for 10 s", waiting);
            exit::exit(EXIT_DEVICE_ERROR)
        }
        device_error("timeout (no completion for 10 s)");
    }
    let info = report::DeviceInfo {
        func,
        cfg,
        features,
        offered,
        qsize,
        common_cfg: dev.common,
        bar_relocated: dev.relocated,
        tsc_khz: khz,
        tsc_source,
        ring0_ns,
        first_io_ns,
        apic_id,
    };
    report::print(&p, size, &engine, &info);
    let code = if engine.stats.errors > 0 {
        EXIT_DEVICE_ERROR
    } else if engine.stats.verify_errors > 0 {
        EXIT_VERIFY
    } else {
        EXIT_OK
    };
    exit::exit(code)
}
