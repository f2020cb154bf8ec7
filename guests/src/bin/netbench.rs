//! netbench: a bare-metal virtio-net benchmark. PVH boot, modern virtio-pci
//! driven by polling from ring 3, a minimal Ethernet/ARP/IPv4/ICMP/UDP stack,
//! ping RTTs timed with the TSC into a log-linear histogram, a UDP flood,
//! and one JSON report line on the serial console.
//!
//! Exit codes (isa-debug-exit port 0xf4): see the `EXIT_*` constants.
#![no_std]
#![no_main]

#[path = "netbench/nic.rs"]
mod nic;
#[path = "netbench/report.rs"]
mod report;
#[path = "netbench/run.rs"]
mod run;

use nic::{Nic, MAX_QSIZE};
use ringvm_guests::arch::rdtsc;
use ringvm_guests::bench::netparams::{Mode, NetParams};
use ringvm_guests::hist::Histogram;
use ringvm_guests::netproto::{self, IpFmt, Mac, MacFmt};
use ringvm_guests::start_info::{StartInfo, MEMMAP_MAX};
use ringvm_guests::tsc::{self, Clock, TscSource};
use ringvm_guests::virtio::net::{self, NetConfig, RX_QUEUE, TX_QUEUE};
use ringvm_guests::virtio::pci::{TransportError, VirtioPci};
use ringvm_guests::virtio::queue::SplitQueue;
use ringvm_guests::virtio::{self as virtio, status};
use ringvm_guests::{entry, exit, println};
use run::{Bench, RunError};

/// ping: at least one reply; echo, flood: the run completed.
pub const EXIT_OK: u32 = 0;
/// No usable virtio-net PCI device.
pub const EXIT_NO_DEVICE: u32 = 2;
/// The device failed (setup refused, transmit stalled, bad used entries) or
/// the peer did not answer ARP.
pub const EXIT_DEVICE_ERROR: u32 = 3;
/// A parameter is malformed or impossible on this device/VM.
pub const EXIT_BAD_PARAM: u32 = 5;
/// ping: every echo request went unanswered.
pub const EXIT_ALL_LOST: u32 = 7;

const VIRTIO_NET_MODERN: u16 = 0x1041;
const VIRTIO_NET_TRANSITIONAL: u16 = 0x1000;


entry!(main);

static mut HIST: Histogram = Histogram::new();

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
            println!("no device: virtio-net has no modern (virtio 1.0) capabilities");
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

/// A locally administered MAC from the TSC, for devices without VIRTIO_NET_F_MAC.
fn generated_mac() -> Mac {
    let t = rdtsc().to_le_bytes();
    [0x02, 0x52, 0x56, t[0], t[1], t[2] ^ t[3]]
}

fn main(si: &StartInfo) -> ! {
    let cmd = si.cmdline();
    let p = match NetParams::parse(cmd) {
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

    let Some(func) = virtio::pci::find_device(VIRTIO_NET_MODERN, VIRTIO_NET_TRANSITIONAL) else {
        println!("no device: no virtio-net PCI function on bus 0");
        exit::exit(EXIT_NO_DEVICE)
    };
    let mut reserved = [(0u64, 0u64); MEMMAP_MAX];
    for (r, m) in reserved.iter_mut().zip(&si.memmap[..si.memmap_entries]) {
        *r = (m.addr, m.addr.saturating_add(m.size));
    }
    let dev = VirtioPci::new(func, &reserved[..si.memmap_entries]).unwrap_or_else(|e| transport_error(e));

    // Reset → ACKNOWLEDGE → DRIVER → FEATURES_OK → queues (RX filled) → DRIVER_OK.
    dev.reset().unwrap_or_else(|e| transport_error(e));
    dev.add_status(status::ACKNOWLEDGE);
    dev.add_status(status::DRIVER);
    let offered = dev.device_features();
    if offered & virtio::F_VERSION_1 == 0 {
        dev.add_status(status::FAILED);
        println!("no device: virtio-net does not offer VERSION_1");
        exit::exit(EXIT_NO_DEVICE);
    }
    let features = offered & net::DRIVER_FEATURES;
    dev.negotiate(features).unwrap_or_else(|e| transport_error(e));
    let cfg = NetConfig::read(&dev, features);

    let fail = |key, reason| -> ! {
        dev.add_status(status::FAILED);
        bad_param(key, ringvm_guests::cmdline::get(cmd, key).unwrap_or(""), reason)
    };
    if let Some(mtu) = cfg.mtu {
        let l3 = p.size + netproto::IPV4_HLEN + 8;
        if l3 > usize::from(mtu) {
            fail("size", "the packet exceeds the device's MTU");
        }
    }
    if p.rx_buf < ringvm_guests::bench::netparams::RX_BUF_MAX && features & net::F_MRG_RXBUF == 0 {
        fail("rxbuf", "buffers smaller than 2048 bytes need MRG_RXBUF, which the device did not offer");
    }
    let (mac, mac_source) = match (p.mac, cfg.mac) {
        (Some(m), _) => (m, "cmdline"),
        (None, Some(m)) if netproto::is_unicast_mac(&m) => (m, "device"),
        _ => (generated_mac(), "generated"),
    };

    let qsize = |q: u16| -> u16 {
        let max = dev.queue_max_size(q);
        if max == 0 {
            transport_error(TransportError::NoQueue(q));
        }
        match p.qsize {
            Some(s) if s > max => fail("qsize", "larger than the device's queue size"),
            Some(s) => s,
            // Legacy-sized rings (max not a power of two) are not expected on a modern device.
            None => max.min(MAX_QSIZE),
        }
    };
    let (rx_size, tx_size) = (qsize(RX_QUEUE), qsize(TX_QUEUE));
    if !rx_size.is_power_of_two() || !tx_size.is_power_of_two() {
        device_error("queue size is not a power of two");
    }
    if rx_size > MAX_QSIZE || tx_size > MAX_QSIZE {
        fail("qsize", "larger than 1024");
    }

    let mut bump = ringvm_guests::mem::arena(si);
    let event_idx = features & virtio::F_EVENT_IDX != 0;
    let mut queue = |index: u16, size: u16| -> SplitQueue {
        let Some(mut q) = SplitQueue::alloc(&mut bump, index, size, event_idx) else {
            fail("qsize", "rings do not fit in guest memory")
        };
        let notify = dev.setup_queue(index, size, q.desc, q.avail, q.used).unwrap_or_else(|e| transport_error(e));
        q.set_notify_addr(notify);
        q
    };
    let rx = queue(RX_QUEUE, rx_size);
    let tx = queue(TX_QUEUE, tx_size);
    let Some(nic) = Nic::new(&mut bump, rx, tx, features & net::F_MRG_RXBUF != 0, p.rx_buf) else {
        fail("qsize", "buffers do not fit in guest memory")
    };
    dev.add_status(status::DRIVER_OK);
    if dev.status() & (status::NEEDS_RESET | status::FAILED) != 0 {
        device_error("device needs reset after DRIVER_OK");
    }

    println!(
        "netbench: {:02x}:{:02x}.{} mac {} ({}) ip {} features {:#x} qsize rx {} tx {} link {} cfg {:#x}{} tsc {} kHz ({}) ring0 {} us",
        func.bus, func.dev, func.func, MacFmt(mac), mac_source, IpFmt(p.ip), features, rx_size, tx_size,
        if cfg.link_up() { "up" } else { "down" }, dev.common,
        if dev.relocated { " (BAR moved below 4 GiB)" } else { "" }, khz, tsc_source.name(), ring0_ns / 1000
    );

    // SAFETY: HIST is only touched here, on the only thread.
    let hist = unsafe { &mut *(&raw mut HIST) };
    let mut bench = Bench::new(nic, p, clock, mac, hist);
    let result = bench.run();
    dev.reset().ok();
    match result {
        Err(RunError::PeerUnresolved) => {
            println!(
                "device error: peer {} unresolved (no ARP reply to {} requests in {} ms; rx frames {})",
                IpFmt(p.peer),
                bench.stats.arp_requests_sent,
                u64::from(run::ARP_TRIES) * run::ARP_RETRY_NS / 1_000_000,
                bench.nic.stats.rx_frames
            );
            exit::exit(EXIT_DEVICE_ERROR)
        }
        Err(RunError::TxStalled) => device_error("transmit stalled (no completion for 10 s)"),
        Ok(()) => {}
    }
    if let Some(m) = bench.peer_mac {
        if bench.stats.arp_ns > 0 {
            println!("netbench: peer {} is at {} (arp {} us)", IpFmt(p.peer), MacFmt(m), bench.stats.arp_ns / 1000);
        } else {
            println!("netbench: peer {} is at {} (from its ARP request)", IpFmt(p.peer), MacFmt(m));
        }
    }
    let info = report::DeviceInfo {
        func,
        features,
        offered,
        mac,
        mac_source,
        cfg,
        rx_size,
        tx_size,
        common_cfg: dev.common,
        bar_relocated: dev.relocated,
        tsc_khz: khz,
        tsc_source,
        ring0_ns,
    };
    report::print(&bench, &info);
    let code = if bench.nic.stats.bad_used > 0 {
        println!("device error: {} used-ring entries named descriptors the driver had not made available", bench.nic.stats.bad_used);
        EXIT_DEVICE_ERROR
    } else if p.mode == Mode::Ping && bench.stats.received == 0 {
        EXIT_ALL_LOST
    } else {
        EXIT_OK
    };
    exit::exit(code)
}
