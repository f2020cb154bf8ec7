//! The end-of-run report: one human summary line, then exactly one JSON
//! line starting with `{"blkbench":1,` (schema in guests/README.md).

use super::engine::Engine;
use ringvm_guests::bench::params::Params;
use ringvm_guests::hist::Histogram;
use ringvm_guests::irq;
use ringvm_guests::json::{Buf, Json};
use ringvm_guests::pci::Function;
use ringvm_guests::serial;
use ringvm_guests::tsc::TscSource;
use ringvm_guests::virtio::blk::BlkConfig;
use ringvm_guests::{print, println};

/// What the report says about the device and platform.
pub struct DeviceInfo {
    pub func: Function,
    pub cfg: BlkConfig,
    pub features: u64,
    pub offered: u64,
    pub qsize: u16,
    pub common_cfg: u64,
    pub bar_relocated: bool,
    pub tsc_khz: u64,
    pub tsc_source: TscSource,
    pub ring0_ns: u64,
    /// Guest entry to the first I/O submission.
    pub first_io_ns: u64,
    /// irq=1: the local APIC id the MSI-X messages go to.
    pub apic_id: Option<u8>,
}

/// Room for the JSON line (a full histogram is ~4000 buckets; irq=1 adds a second).
static mut JSON_BUF: [u8; 192 * 1024] = [0; 192 * 1024];

const PERCENTILES: [(&str, u64); 6] =
    [("p50", 50_000), ("p90", 90_000), ("p99", 99_000), ("p99_9", 99_900), ("p99_99", 99_990), ("p99_999", 99_999)];

pub fn print(p: &Params, size: u64, e: &Engine, d: &DeviceInfo) {
    let h: &Histogram = e.hists().lat;
    let st = &e.stats;
    let ios = st.reads + st.writes;
    let secs = e_seconds(e, d);
    let iops = if secs > 0.0 { ios as f64 / secs } else { 0.0 };
    let mib_s = if secs > 0.0 { st.bytes as f64 / secs / (1024.0 * 1024.0) } else { 0.0 };
    let verify = if !p.verify {
        "off"
    } else if st.verify_errors > 0 {
        "mismatch"
    } else {
        "ok"
    };
    println!(
        "blkbench: {} bs={} qd={} queues={}: {} ios in {:.3} s, {:.0} IOPS, {:.1} MiB/s, lat us min {:.1} mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}, errors {}, verify {}",
        p.rw.name(), p.bs, p.qd, p.queues, ios, secs, iops, mib_s,
        us(h.min.min(h.max)), us(h.mean()), us(h.percentile(50_000)), us(h.percentile(99_000)),
        us(h.percentile(99_900)), us(h.max), st.errors, verify
    );

    // SAFETY: the report is built once, on the only thread.
    let buf = unsafe { &mut *(&raw mut JSON_BUF) };
    let mut out = Buf::new(buf);
    let mut j = Json::new(&mut out);
    j.begin_object();
    j.u64("blkbench", 1);
    j.begin_object_field("params");
    j.str("rw", p.rw.name());
    j.u64("bs", p.bs);
    j.u64("qd", u64::from(p.qd));
    j.u64("queues", u64::from(p.queues));
    j.u64("rwmix", p.read_percent());
    match p.runtime_ns {
        Some(ns) => j.f64("runtime", ns as f64 / 1e9, 3),
        None => j.null("runtime"),
    }
    match p.ios {
        Some(n) => j.u64("ios", n),
        None => j.null("ios"),
    }
    j.f64("ramp", p.ramp_ns as f64 / 1e9, 3);
    j.u64("size", size);
    j.u64("seed", p.seed);
    j.u64("verify", u64::from(p.verify));
    j.u64("flush_every", p.flush_every);
    j.u64("irq", u64::from(p.irq));
    j.u64("qsize", u64::from(d.qsize));
    j.bool("indirect", e.indirect);
    j.end_object();
    j.u64("ios", ios);
    j.u64("reads", st.reads);
    j.u64("writes", st.writes);
    j.u64("flushes", st.flushes);
    j.u64("bytes", st.bytes);
    j.f64("seconds", secs, 6);
    j.f64("iops", iops, 1);
    j.f64("mib_s", mib_s, 3);
    j.begin_object_field("lat_ns");
    j.u64("min", if h.total == 0 { 0 } else { h.min });
    j.u64("mean", h.mean());
    for (name, pct) in PERCENTILES {
        j.u64(name, h.percentile(pct));
    }
    j.u64("max", h.max);
    j.end_object();
    j.begin_array_field("hist");
    for (v, c) in h.buckets() {
        j.pair(v, c);
    }
    j.end_array();
    j.u64("errors", st.errors);
    j.str("verify", verify);
    j.u64("verify_errors", st.verify_errors);
    j.u64("verify_sectors", st.verify_sectors);
    j.str("verify_mode", if !p.verify { "off" } else if e.verify_table { "exact" } else { "stamp" });
    j.u64("kicks", st.kicks);
    if let Some(apic_id) = d.apic_id.filter(|_| p.irq) {
        let hs = e.hists();
        j.begin_object_field("irq");
        j.u64("vector_base", u64::from(irq::VECTOR_BASE));
        j.u64("apic_id", u64::from(apic_id));
        j.u64("interrupts", st.interrupts);
        j.u64("without_interrupt", st.without_interrupt);
        summary(&mut j, "handler_ns", hs.irq_handler);
        summary(&mut j, "wake_ns", hs.irq_wake);
        j.begin_array_field("handler_hist");
        for (v, c) in hs.irq_handler.buckets() {
            j.pair(v, c);
        }
        j.end_array();
        j.end_object();
    }
    j.begin_object_field("device");
    let mut pci = [0u8; 8];
    j.str("pci", bdf(d.func, &mut pci));
    j.u64("num_queues", u64::from(d.cfg.num_queues));
    j.u64("capacity_sectors", d.cfg.capacity_sectors);
    j.u64("blk_size", u64::from(d.cfg.blk_size));
    j.u64("seg_max", u64::from(d.cfg.seg_max));
    j.u64("features", d.features);
    j.u64("features_offered", d.offered);
    j.u64("common_cfg", d.common_cfg);
    j.bool("bar_relocated", d.bar_relocated);
    j.end_object();
    j.begin_object_field("platform");
    j.u64("tsc_khz", d.tsc_khz);
    j.str("tsc_source", d.tsc_source.name());
    j.u64("ring0_ns", d.ring0_ns);
    j.u64("first_io_ns", d.first_io_ns);
    j.end_object();
    j.end_object();
    if out.truncated {
        println!("blkbench: JSON report truncated");
    }
    serial::write_bytes(out.as_bytes());
    print!("\n");
}

/// `"key": {count, min, mean, p50 … p99_999, max}` of one histogram.
fn summary<W: core::fmt::Write>(j: &mut Json<'_, W>, key: &str, h: &Histogram) {
    j.begin_object_field(key);
    j.u64("count", h.total);
    j.u64("min", if h.total == 0 { 0 } else { h.min });
    j.u64("mean", h.mean());
    for (name, pct) in PERCENTILES {
        j.u64(name, h.percentile(pct));
    }
    j.u64("max", h.max);
    j.end_object();
}

fn e_seconds(e: &Engine, d: &DeviceInfo) -> f64 {
    let cycles = e.stats.end_tsc.saturating_sub(e.stats.start_tsc);
    cycles as f64 / (d.tsc_khz as f64 * 1000.0)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn bdf(f: Function, out: &mut [u8; 8]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    *out = [
        HEX[usize::from(f.bus >> 4)],
        HEX[usize::from(f.bus & 15)],
        b':',
        HEX[usize::from(f.dev >> 4)],
        HEX[usize::from(f.dev & 15)],
        b'.',
        b'0' + f.func,
        0,
    ];
    core::str::from_utf8(&out[..7]).unwrap_or("?")
}
