//! The end-of-run report: one human summary line, then exactly one JSON
//! line starting with `{"netbench":1,` (schema in guests/README.md).

use super::run::Bench;
use ringvm_guests::bench::netparams::Mode;
use ringvm_guests::json::{Buf, Json};
use ringvm_guests::netproto::{IpFmt, Mac, MacFmt};
use ringvm_guests::pci::Function;
use ringvm_guests::serial;
use ringvm_guests::tsc::TscSource;
use ringvm_guests::virtio::net::NetConfig;
use ringvm_guests::{print, println};

/// What the report says about the device and platform.
pub struct DeviceInfo {
    pub func: Function,
    pub features: u64,
    pub offered: u64,
    pub mac: Mac,
    pub mac_source: &'static str,
    pub cfg: NetConfig,
    pub rx_size: u16,
    pub tx_size: u16,
    pub common_cfg: u64,
    pub bar_relocated: bool,
    pub tsc_khz: u64,
    pub tsc_source: TscSource,
    pub ring0_ns: u64,
}

/// Room for the JSON line (a full histogram is ~4000 buckets).
static mut JSON_BUF: [u8; 128 * 1024] = [0; 128 * 1024];

const PERCENTILES: [(&str, u64); 4] = [("p50", 50_000), ("p90", 90_000), ("p99", 99_000), ("p99_9", 99_900)];

/// Formats into a small stack buffer (addresses for JSON strings).
struct Small {
    bytes: [u8; 24],
    len: usize,
}

impl Small {
    fn of(v: impl core::fmt::Display) -> Small {
        let mut s = Small { bytes: [0; 24], len: 0 };
        let mut b = Buf::new(&mut s.bytes);
        let _ = core::fmt::Write::write_fmt(&mut b, format_args!("{}", v));
        s.len = b.as_bytes().len();
        s
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }
}

pub fn print(b: &Bench, d: &DeviceInfo) {
    let p = &b.p;
    let st = &b.stats;
    let ns = &b.nic.stats;
    let h = b.hist();
    let secs = b.seconds();
    let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    match p.mode {
        Mode::Ping => println!(
            "netbench: ping {} size {}: {} sent, {} received, {} lost, rtt us min {:.1} mean {:.1} p50 {:.1} p99 {:.1} max {:.1}",
            IpFmt(p.peer), p.size, st.sent, st.received, st.lost,
            us(if h.total == 0 { 0 } else { h.min }), us(h.mean()), us(h.percentile(50_000)), us(h.percentile(99_000)), us(h.max)
        ),
        Mode::Flood => println!(
            "netbench: flood udp {}:{} size {}: {} packets in {:.3} s, {:.0} pps, {:.1} Mbit/s payload, rx frames {}",
            IpFmt(p.peer), p.port, p.size, st.udp_packets, secs, rate(st.udp_packets), rate(st.udp_bytes) * 8.0 / 1e6, ns.rx_frames
        ),
        Mode::Echo => println!(
            "netbench: echo {}: answered {} echo requests and {} ARP requests in {:.3} s, rx frames {}",
            IpFmt(p.ip), st.echo_replies_sent, st.arp_replies_sent, secs, ns.rx_frames
        ),
    }

    // SAFETY: the report is built once, on the only thread.
    let buf = unsafe { &mut *(&raw mut JSON_BUF) };
    let mut out = Buf::new(buf);
    let mut j = Json::new(&mut out);
    j.begin_object();
    j.u64("netbench", 1);
    j.begin_object_field("params");
    j.str("mode", p.mode.name());
    j.str("ip", Small::of(IpFmt(p.ip)).as_str());
    j.str("peer", Small::of(IpFmt(p.peer)).as_str());
    j.str("mac", Small::of(MacFmt(d.mac)).as_str());
    match p.count {
        Some(n) => j.u64("count", n),
        None => j.null("count"),
    }
    match p.runtime_ns {
        Some(ns) => j.f64("runtime", ns as f64 / 1e9, 3),
        None => j.null("runtime"),
    }
    j.u64("interval_us", p.interval_ns / 1000);
    j.u64("size", p.size as u64);
    j.u64("port", u64::from(p.port));
    j.u64("timeout_ms", p.timeout_ns / 1_000_000);
    j.u64("rx_qsize", u64::from(d.rx_size));
    j.u64("tx_qsize", u64::from(d.tx_size));
    j.end_object();
    j.str("mode", p.mode.name());
    j.u64("sent", st.sent);
    j.u64("received", st.received);
    j.u64("lost", st.lost);
    j.u64("stray_replies", st.stray_replies);
    j.f64("seconds", secs, 6);
    j.begin_object_field("rtt_ns");
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
    if p.mode == Mode::Flood {
        j.begin_object_field("udp");
        j.u64("packets", st.udp_packets);
        j.u64("bytes", st.udp_bytes);
        j.u64("frame_bytes", st.udp_frame_bytes);
        j.f64("pps", rate(st.udp_packets), 1);
        j.f64("mbit_s", rate(st.udp_bytes) * 8.0 / 1e6, 3);
        j.f64("frame_mbit_s", rate(st.udp_frame_bytes) * 8.0 / 1e6, 3);
        j.end_object();
    }
    j.begin_object_field("tx");
    j.u64("frames", ns.tx_completed);
    j.u64("submitted", ns.tx_submitted);
    j.u64("arp_requests", st.arp_requests_sent);
    j.u64("arp_replies", st.arp_replies_sent);
    j.u64("echo_replies", st.echo_replies_sent);
    j.u64("dropped", st.tx_dropped);
    j.u64("kicks", b.nic.kicks());
    j.end_object();
    j.begin_object_field("rx");
    j.u64("frames", ns.rx_frames);
    j.u64("bytes", ns.rx_bytes);
    j.u64("arp", st.rx_arp);
    j.u64("icmp", st.rx_icmp);
    j.u64("other", st.rx_other);
    j.u64("bad", st.rx_bad);
    j.u64("multi_buffer", ns.rx_multi_buffer);
    j.u64("max_buffers", ns.rx_max_buffers);
    j.u64("multi_missing", ns.rx_multi_missing);
    j.u64("echo_too_big", st.echo_too_big);
    j.u64("bad_len", ns.rx_bad_len);
    j.end_object();
    match b.peer_mac {
        Some(m) => j.str("peer_mac", Small::of(MacFmt(m)).as_str()),
        None => j.null("peer_mac"),
    }
    j.u64("arp_ns", st.arp_ns);
    j.begin_object_field("device");
    j.str("pci", Small::of(Bdf(d.func)).as_str());
    j.str("mac_source", d.mac_source);
    j.bool("link_up", d.cfg.link_up());
    match d.cfg.mtu {
        Some(m) => j.u64("mtu", u64::from(m)),
        None => j.null("mtu"),
    }
    j.u64("features", d.features);
    j.u64("features_offered", d.offered);
    j.u64("bad_used", ns.bad_used);
    j.u64("common_cfg", d.common_cfg);
    j.bool("bar_relocated", d.bar_relocated);
    j.end_object();
    j.begin_object_field("platform");
    j.u64("tsc_khz", d.tsc_khz);
    j.str("tsc_source", d.tsc_source.name());
    j.u64("ring0_ns", d.ring0_ns);
    j.end_object();
    j.end_object();
    if out.truncated {
        println!("netbench: JSON report truncated");
    }
    serial::write_bytes(out.as_bytes());
    print!("\n");
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

struct Bdf(Function);

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.0.bus, self.0.dev, self.0.func)
    }
}
