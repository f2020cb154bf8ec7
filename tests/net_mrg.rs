//! End to end: frames larger than one receive buffer reach the netbench guest over several
//! MRG_RXBUF buffers. The tap gets a 9000-byte MTU (`mtu=9000`), the guest posts 1526-byte
//! buffers (`rxbuf=1526`), and the host pings it (a raw ICMP socket from python3) with 8000
//! bytes of payload: each echo request arrives in 6 buffers with `num_buffers = 6`, and the
//! guest gathers the frame and checks its IPv4 and ICMP checksums (netbench answers only requests that fit one transmit
//! buffer, so the jumbo ones are counted, not answered).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{guest, have_kvm, Netns};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// ICMP payload of the jumbo pings, and the buffers their frames need: virtio-net header,
/// Ethernet, IPv4 and ICMP headers, payload, over 1526-byte buffers.
const JUMBO: usize = 8000;
const BUFFERS: u64 = (12 + 14 + 20 + 8 + JUMBO as u64).div_ceil(1526);
const JUMBO_PINGS: u64 = 5;

impl Netns {
    /// One echo request from the host with `size` bytes of payload, DF set (a raw ICMP socket
    /// from python3: the host may have no `ping`); true when answered within a second.
    fn ping(&self, size: usize) -> bool {
        self.exec(&["python3", "-c", PINGER, "10.213.0.2", &size.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// Sends one ICMP echo request (DF set) and waits a second for its reply; exit 0 if it came.
const PINGER: &str = r#"
import os, socket, struct, sys, time
dst, size = sys.argv[1], int(sys.argv[2])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
ident, seq = os.getpid() & 0xffff, 1
data = bytes((i * 7 + 3) & 0xff for i in range(size))
hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + data), ident, seq) + data
s.sendto(pkt, (dst, 0))
s.settimeout(0.2)
end = time.time() + 1
while time.time() < end:
    try:
        r = s.recv(65536)
    except socket.timeout:
        continue
    ihl = (r[0] & 15) * 4
    t, _, _, i, q = struct.unpack("!BBHHH", r[ihl:ihl + 8])
    if t == 0 and i == ident and q == seq:
        sys.exit(0)
sys.exit(1)
"#;

#[test]
fn test_jumbo_frames_reach_guest_over_several_mrg_buffers() {
    if !have_kvm() {
        return;
    }
    let Some(ns) = Netns::new("j") else { return };
    let script = format!("{ROOT}/scripts/net/routed.sh");
    let out = ns
        .exec(&[&script, "rvtap0", "10.213.0.1", "10.213.0.2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "routed.sh: {out:?}");
    let mut vm = ns
        .exec(&[
            env!("CARGO_BIN_EXE_ringvm"),
            "run",
            "--kernel",
            &guest("netbench").to_string_lossy(),
            "--memory",
            "64M",
            "--net",
            "tap=rvtap0,mtu=9000",
            "--cmdline",
            "mode=echo ip=10.213.0.2 peer=10.213.0.1 rxbuf=1526 runtime=15",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The guest answers small pings once it is up.
    let t = Instant::now();
    let mut up = false;
    while !up && t.elapsed() < Duration::from_secs(30) {
        up = ns.ping(56);
    }
    for _ in 0..JUMBO_PINGS {
        ns.ping(JUMBO);
    }
    let small_after = ns.ping(56);
    let t = Instant::now();
    while vm.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = vm.kill();
    let out = vm.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        up,
        "the guest never answered a ping\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        small_after,
        "no answer after the jumbo frames\nstdout: {stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"netbench\":"))
        .unwrap_or_else(|| panic!("no netbench result\nstdout: {stdout}\nstderr: {stderr}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let rx = &v["rx"];
    assert_eq!(
        rx["echo_too_big"], JUMBO_PINGS,
        "jumbo requests with good checksums: {v}"
    );
    assert_eq!(rx["multi_buffer"], JUMBO_PINGS, "{v}");
    assert_eq!(rx["max_buffers"], BUFFERS, "{v}");
    assert_eq!(rx["multi_missing"], 0, "{v}");
    assert_eq!(rx["bad"], 0, "{v}");
    assert_eq!(rx["bad_len"], 0, "{v}");
}
