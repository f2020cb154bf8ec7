//! Device tests: a synthetic driver, real reactors and a real tap (`rvt<pid><n>`, removed
//! when the device drops it). The tap gets 10.213.K.1/30 and nothing else (IPv6 off), so
//! the only traffic is what a test sends to its own addresses. Without CAP_NET_ADMIN the
//! tests print SKIP with the reason.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::features as f;
use super::ctrl::{ACK_ERR, ACK_OK, CLASS_MQ, CLASS_RX, MQ_VQ_PAIRS_SET};
use super::frame::VnetHdr;
use super::*;
use crate::devices::virtio::block::driver::{Buf, TestDriver};
use crate::reactor::{ReactorOptions, ReactorPool};
use crate::vmm::exit::ExitHandle;

mod lifecycle;
mod mrg;
mod pairs;

const MEM: usize = 32 << 20;
const QUEUE_SPAN: u64 = 4 << 20;
const QSIZE: u16 = 128;
const WAIT: Duration = Duration::from_secs(5);
const ETHERTYPE_TEST: u16 = 0x88b5;
const ACKED: u64 =
    F_VERSION_1 | f::MAC | f::STATUS | f::MRG_RXBUF | f::CTRL_VQ | f::CSUM | f::HOST_TSO4;

static NEXT_TAP: AtomicU32 = AtomicU32::new(0);

struct Q {
    drv: TestDriver,
    kick: EventFd,
    irq: EventFd,
}

struct Harness {
    pool: Option<ReactorPool>,
    dev: NetDevice,
    qs: Vec<Option<Q>>,
    subnet: u8,
}

fn tap_name() -> (String, u8) {
    let n = NEXT_TAP.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    (
        format!("rvt{}{n}", pid % 10000),
        ((pid * 7 + n * 13) % 250) as u8 + 1,
    )
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A static neighbour entry for the "guest" address on the harness's tap, so host sockets
/// send to it without ARP.
fn static_neighbour(h: &Harness) {
    let name = h.dev.tap().name().to_string();
    ip(&[
        "neigh",
        "replace",
        &format!("10.213.{}.2", h.subnet),
        "lladdr",
        "52:54:00:12:34:77",
        "dev",
        &name,
    ]);
}

/// Creates the device on a fresh tap (None: SKIP printed) and activates `enabled` queues.
fn harness(opts: &str, acked: u64, enabled: &[u16]) -> Option<Harness> {
    let (name, subnet) = tap_name();
    let cfg: NetConfig = format!("tap={name},queue-size={QSIZE},{opts}")
        .parse()
        .unwrap();
    let pool = ReactorPool::start(
        ReactorOptions {
            cores: vec![0],
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    )
    .unwrap();
    let mut dev = match NetDevice::new(&cfg, &pool) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "SKIP: cannot create tap {name}: {}",
                crate::error::error_chain(&e)
            );
            return None;
        }
    };
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&[
        "addr",
        "add",
        &format!("10.213.{subnet}.1/30"),
        "dev",
        &name,
    ]);
    ip(&["link", "set", &name, "up"]);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut qs = Vec::new();
    let mut active = Vec::new();
    for i in 0..dev.num_queues() as u16 {
        if !enabled.contains(&i) {
            qs.push(None);
            continue;
        }
        let base = u64::from(i) * QUEUE_SPAN + 0x1000;
        let drv = TestDriver::new(&mem, GuestAddress(base), QSIZE, base - 0x1000 + QUEUE_SPAN);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        active.push(ActiveQueue {
            index: i,
            queue: drv.queue(acked & F_RING_EVENT_IDX != 0),
            kick: kick.try_clone().unwrap(),
            irq: Some(irq.try_clone().unwrap()),
        });
        qs.push(Some(Q { drv, kick, irq }));
    }
    dev.activate(mem, acked, active).unwrap();
    Some(Harness {
        pool: Some(pool),
        dev,
        qs,
        subnet,
    })
}

impl Harness {
    fn q(&mut self, i: usize) -> &mut Q {
        self.qs[i].as_mut().unwrap()
    }

    fn kick(&mut self, i: usize) {
        self.q(i).kick.write(1).unwrap();
    }

    /// Waits until `n` used entries arrived on queue `i` (or more appear while waiting).
    fn wait_used(&mut self, i: usize, n: usize) -> Vec<(u32, u32)> {
        let mut got = Vec::new();
        let t = Instant::now();
        while got.len() < n && t.elapsed() < WAIT {
            got.extend(self.q(i).drv.take_used());
            std::thread::sleep(Duration::from_millis(2));
        }
        got
    }

    fn report(&self) -> crate::metrics::Report {
        self.pool.as_ref().unwrap().snapshot().unwrap()
    }

    /// The RX queue's (queue 0's) counters as of now.
    fn rx_counters(&self) -> crate::metrics::QueueCounters {
        self.report()
            .queues
            .iter()
            .find(|q| q.device == self.dev.name() && q.queue == 0)
            .unwrap()
            .counters
            .clone()
    }

    fn tx_chain(&mut self, frame: &[u8]) -> u16 {
        let d = &mut self.q(1).drv;
        let h = d.alloc(12);
        d.mem
            .write_slice(&VnetHdr::default().to_bytes(), h)
            .unwrap();
        let a = d.alloc(frame.len() as u64);
        d.mem.write_slice(frame, a).unwrap();
        let head = d.write_chain(&[Buf::r(h, 12), Buf::r(a, frame.len() as u32)]);
        d.publish(head);
        head
    }

    /// Posts `n` RX buffers of `len` bytes; returns (head, address).
    fn rx_bufs(&mut self, n: usize, len: u32) -> Vec<(u16, GuestAddress)> {
        let d = &mut self.q(0).drv;
        let mut out = Vec::new();
        for _ in 0..n {
            let a = d.alloc(u64::from(len));
            let head = d.write_chain(&[Buf::w(a, len)]);
            d.publish(head);
            out.push((head, a));
        }
        out
    }
}

fn test_frame(tag: u8) -> Vec<u8> {
    let mut fr = vec![0xff; 6];
    fr.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x99]);
    fr.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    fr.extend_from_slice(b"ringvm-net-test");
    fr.push(tag);
    fr.resize(60, 0);
    fr
}

/// A raw socket that sees every frame the "guest" sends into the tap.
fn capture(tap: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call; the fd is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(tap).unwrap();
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(ifindex > 0);
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: the address is a valid sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval, which `tv` is.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// Frames with our test ethertype seen on `fd` within the wait, by their tag byte.
fn captured_tags(fd: &OwnedFd, want: usize) -> Vec<u8> {
    let mut tags = Vec::new();
    let t = Instant::now();
    let mut buf = [0u8; 2048];
    while tags.len() < want && t.elapsed() < WAIT {
        // SAFETY: `buf` is a valid writable buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 31
            && buf[12..14] == ETHERTYPE_TEST.to_be_bytes()
            && &buf[14..29] == b"ringvm-net-test"
        {
            tags.push(buf[29]);
        }
    }
    tags
}

#[test]
fn test_tx_frames_appear_on_tap_in_order() {
    let Some(mut h) = harness("", ACKED, &[0, 1]) else {
        return;
    };
    let cap = capture(h.dev.tap().name());
    let mut heads: Vec<u16> = (0..3).map(|i| h.tx_chain(&test_frame(i))).collect();
    // The fourth through an indirect table (RING_INDIRECT_DESC).
    let d = &mut h.q(1).drv;
    let hd = d.alloc(12);
    d.mem
        .write_slice(&VnetHdr::default().to_bytes(), hd)
        .unwrap();
    let fr = test_frame(3);
    let a = d.alloc(fr.len() as u64);
    d.mem.write_slice(&fr, a).unwrap();
    let head = d.write_indirect(&[Buf::r(hd, 12), Buf::r(a, fr.len() as u32)]);
    d.publish(head);
    heads.push(head);
    h.kick(1);
    let used = h.wait_used(1, 4);
    assert_eq!(used.iter().map(|u| u.0 as u16).collect::<Vec<_>>(), heads);
    assert!(
        used.iter().all(|u| u.1 == 0),
        "TX used length must be 0: {used:?}"
    );
    assert_eq!(captured_tags(&cap, 4), vec![0, 1, 2, 3]);
    let r = h.report();
    let txq = r
        .queues
        .iter()
        .find(|q| q.device == h.dev.name() && q.queue == 1)
        .unwrap();
    assert_eq!(txq.counters.writes, 4);
    assert_eq!(txq.counters.bytes_written, 4 * 60);
    assert_eq!(txq.kick_to_complete.len(), 4);
    assert!(r.table().contains(h.dev.name()));
}

#[test]
fn test_tx_bad_chains_dropped_and_device_keeps_serving() {
    let Some(mut h) = harness("", ACKED, &[0, 1]) else {
        return;
    };
    let cap = capture(h.dev.tap().name());
    let d = &mut h.q(1).drv;
    let a = d.alloc(64);
    let short = d.write_chain(&[Buf::r(a, 8)]);
    d.publish(short);
    let writable = d.write_chain(&[Buf::r(a, 12), Buf::w(a, 60)]);
    d.publish(writable);
    let oob = d.write_chain(&[Buf::r(a, 12), Buf::r(GuestAddress(MEM as u64 + 4096), 60)]);
    d.publish(oob);
    let gso = d.alloc(12);
    d.mem
        .write_slice(
            &VnetHdr {
                gso_type: frame::GSO_UDP,
                gso_size: 100,
                ..Default::default()
            }
            .to_bytes(),
            gso,
        )
        .unwrap();
    let unneg = d.write_chain(&[Buf::r(gso, 12), Buf::r(a, 60)]);
    d.publish(unneg);
    let good = h.tx_chain(&test_frame(7));
    h.kick(1);
    let used = h.wait_used(1, 5);
    assert_eq!(
        used.iter().map(|u| u.0 as u16).collect::<Vec<_>>(),
        vec![short, writable, oob, unneg, good]
    );
    assert_eq!(captured_tags(&cap, 1), vec![7]);
    let r = h.report();
    let txq = r
        .queues
        .iter()
        .find(|q| q.device == h.dev.name() && q.queue == 1)
        .unwrap();
    assert_eq!((txq.counters.errors, txq.counters.writes), (4, 1));
}

#[test]
fn test_rx_host_arp_lands_in_guest_buffer_with_header() {
    let Some(mut h) = harness("", ACKED, &[0, 1]) else {
        return;
    };
    let bufs = h.rx_bufs(4, 2048);
    h.kick(0);
    // The host resolves the peer on the tap: an ARP request (or the UDP frame itself) comes out.
    let sock = std::net::UdpSocket::bind(format!("10.213.{}.1:0", h.subnet)).unwrap();
    let t = Instant::now();
    let mut used = Vec::new();
    while used.is_empty() && t.elapsed() < WAIT {
        let _ = sock.send_to(b"ping", format!("10.213.{}.2:9", h.subnet));
        used = h.wait_used(0, 1);
    }
    let (head, len) = *used.first().expect("no frame reached the RX queue");
    let (_, addr) = bufs
        .iter()
        .find(|b| u32::from(b.0) == head)
        .copied()
        .unwrap();
    let mut got = vec![0u8; len as usize];
    h.q(0).drv.mem.read_slice(&mut got, addr).unwrap();
    let hdr = VnetHdr::from_bytes(got[..12].try_into().unwrap());
    assert_eq!(hdr.num_buffers, 1);
    let ethertype = u16::from_be_bytes([got[24], got[25]]);
    assert!(
        ethertype == 0x0806 || ethertype == 0x0800,
        "ethertype {ethertype:#x}"
    );
    assert!(len >= 12 + 42, "frame of {len} bytes");
    let rx = h.rx_counters();
    assert!(rx.reads >= 1);
    assert!(rx.bytes_read >= u64::from(len - 12));
}

#[test]
fn test_rx_empty_ring_with_waiting_packet_counts_drop() {
    let Some(mut h) = harness("", ACKED, &[0, 1]) else {
        return;
    };
    h.kick(0);
    let sock = std::net::UdpSocket::bind(format!("10.213.{}.1:0", h.subnet)).unwrap();
    let t = Instant::now();
    let mut errors = 0;
    while errors == 0 && t.elapsed() < WAIT {
        let _ = sock.send_to(b"ping", format!("10.213.{}.2:9", h.subnet));
        std::thread::sleep(Duration::from_millis(20));
        errors = h.rx_counters().errors;
    }
    assert!(errors >= 1, "a packet without RX buffer was not counted");
    // Buffers posted afterwards still receive the waiting frame.
    h.rx_bufs(2, 2048);
    h.kick(0);
    assert!(!h.wait_used(0, 1).is_empty());
}

#[test]
fn test_rx_empty_ring_polling_counts_one_wait_once() {
    // A polling reactor passes many times while the packet waits; the level-triggered poll
    // must not be re-armed (and the wait counted again) on every pass.
    let Some(mut h) = harness("poll-us=1000", ACKED, &[0, 1]) else {
        return;
    };
    h.kick(0);
    let sock = std::net::UdpSocket::bind(format!("10.213.{}.1:0", h.subnet)).unwrap();
    sock.send_to(b"ping", format!("10.213.{}.2:9", h.subnet))
        .unwrap();
    let t = Instant::now();
    while h.rx_counters().errors == 0 && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        h.rx_counters().errors,
        1,
        "one waiting packet, counted once"
    );
    // A buffer posted afterwards takes the frame, and the poll watches again after that.
    h.rx_bufs(1, 2048);
    h.kick(0);
    assert!(!h.wait_used(0, 1).is_empty());
}

#[test]
fn test_rx_bad_chains_returned_empty_and_counted() {
    let Some(mut h) = harness("", ACKED, &[0, 1]) else {
        return;
    };
    let d = &mut h.q(0).drv;
    let a = d.alloc(2048);
    let readable = d.write_chain(&[Buf::r(a, 2048)]);
    d.publish(readable);
    let short = d.write_chain(&[Buf::w(a, 4)]);
    d.publish(short);
    let oob = d.write_chain(&[Buf::w(GuestAddress(u64::MAX - 100), 2048)]);
    d.publish(oob);
    h.kick(0);
    let used = h.wait_used(0, 3);
    assert_eq!(
        used,
        vec![
            (u32::from(readable), 0),
            (u32::from(short), 0),
            (u32::from(oob), 0)
        ]
    );
}

#[test]
fn test_rx_frame_larger_than_buffer_dropped_and_buffer_reused() {
    let Some(mut h) = harness("", ACKED, &[0, 1]) else {
        return;
    };
    h.rx_bufs(1, 30);
    h.kick(0);
    let sock = std::net::UdpSocket::bind(format!("10.213.{}.1:0", h.subnet)).unwrap();
    let t = Instant::now();
    let mut errors = 0;
    while errors == 0 && t.elapsed() < WAIT {
        let _ = sock.send_to(b"ping", format!("10.213.{}.2:9", h.subnet));
        std::thread::sleep(Duration::from_millis(20));
        errors = h.rx_counters().errors;
    }
    assert!(
        errors >= 1,
        "a frame larger than the buffer was not counted as dropped"
    );
    let used = h.q(0).drv.take_used();
    assert!(
        used.is_empty(),
        "the short buffer must stay posted, not be returned truncated: {used:?}"
    );
}

#[test]
fn test_rx_reads_capped_and_reset_returns_only_posted_chains() {
    let (name, _) = tap_name();
    let cfg: NetConfig = format!("tap={name},queue-size=128").parse().unwrap();
    let pool = ReactorPool::start(
        ReactorOptions {
            cores: vec![0],
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    )
    .unwrap();
    let mut dev = match NetDevice::new(&cfg, &pool) {
        Ok(d) => d,
        Err(e) => return eprintln!("SKIP: cannot create tap {name}: {e}"),
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut drv = TestDriver::new(&mem, GuestAddress(0x1000), 128, QUEUE_SPAN);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let q = ActiveQueue {
        index: 0,
        queue: drv.queue(true),
        kick: kick.try_clone().unwrap(),
        irq: None,
    };
    dev.activate(mem, ACKED | F_RING_EVENT_IDX, vec![q])
        .unwrap();
    for _ in 0..100 {
        let a = drv.alloc(2048);
        let head = drv.write_chain(&[Buf::w(a, 2048)]);
        drv.publish(head);
    }
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    dev.reset();
    let mut used: Vec<u32> = drv.take_used().into_iter().map(|u| u.0).collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), rx::RX_POSTED_MAX);
    drop(pool);
}

#[test]
fn test_tx_on_second_pair_reaches_multiqueue_tap() {
    let Some(mut h) = harness("queues=2", ACKED | f::MQ, &[0, 1, 2, 3, 4]) else {
        return;
    };
    let cap = capture(h.dev.tap().name());
    // Pair 1 is served once the driver asks for two pairs (tests/pairs.rs).
    let (_, ack) = lifecycle::ctrl_cmd(&mut h, 4, CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes());
    h.kick(4);
    h.wait_used(4, 1);
    assert_eq!(h.q(4).drv.mem.read_obj::<u8>(ack).unwrap(), ACK_OK);
    let d = &mut h.q(3).drv;
    let hd = d.alloc(12);
    d.mem
        .write_slice(&VnetHdr::default().to_bytes(), hd)
        .unwrap();
    let fr = test_frame(42);
    let a = d.alloc(fr.len() as u64);
    d.mem.write_slice(&fr, a).unwrap();
    let head = d.write_chain(&[Buf::r(hd, 12), Buf::r(a, fr.len() as u32)]);
    d.publish(head);
    h.kick(3);
    assert_eq!(h.wait_used(3, 1), vec![(u32::from(head), 0)]);
    assert_eq!(captured_tags(&cap, 1), vec![42]);
}

/// Host-to-guest UDP flood through the RX path: prints frames received and reactor busy ns
/// per frame. `cargo test --release --lib net::tests::rx_flood -- --ignored --nocapture`;
/// with `RX_FLOOD_GSO=1` the driver also acknowledges GUEST_CSUM and GUEST_TSO4, so with
/// MRG_RXBUF every read spans enough 2 KiB buffers for a 64 KiB frame (rx.rs).
#[test]
#[ignore]
fn rx_flood() {
    let gso = std::env::var("RX_FLOOD_GSO").is_ok_and(|v| v == "1");
    let acked = ACKED
        | if gso {
            f::GUEST_CSUM | f::GUEST_TSO4
        } else {
            0
        };
    let Some(mut h) = harness("", acked, &[0, 1]) else {
        return;
    };
    static_neighbour(&h);
    let bufs = h.rx_bufs(usize::from(QSIZE), 2048);
    h.kick(0);
    let sock = std::net::UdpSocket::bind(format!("10.213.{}.1:0", h.subnet)).unwrap();
    let dst = format!("10.213.{}.2:9", h.subnet);
    let r0 = h.report();
    let t = Instant::now();
    let mut got = 0usize;
    let mut sent = 0usize;
    while t.elapsed() < Duration::from_secs(2) {
        for _ in 0..8 {
            if sock.send_to(&[0u8; 64], &dst).is_ok() {
                sent += 1;
            }
        }
        for (head, _) in h.q(0).drv.take_used() {
            got += 1;
            h.q(0).drv.publish(head as u16);
        }
        h.q(0).kick.write(1).unwrap();
    }
    let r1 = h.report();
    let busy = r1.reactors[0].busy_ns - r0.reactors[0].busy_ns;
    let rxq = r1
        .queues
        .iter()
        .find(|q| q.device == h.dev.name() && q.queue == 0)
        .unwrap();
    eprintln!(
        "gso {gso} RX_POSTED_MAX {} sent {sent} received {got} (counter {}) drops {} busy ns/frame {}",
        rx::RX_POSTED_MAX,
        rxq.counters.reads,
        rxq.counters.errors,
        busy / rxq.counters.reads.max(1)
    );
    let _ = bufs;
}

#[test]
fn test_tx_interrupts_follow_event_idx() {
    let Some(mut h) = harness("", ACKED | F_RING_EVENT_IDX, &[0, 1]) else {
        return;
    };
    // used_event 0: the driver wants an interrupt once the first entry is used.
    h.q(1).drv.set_used_event(0);
    h.tx_chain(&test_frame(1));
    h.kick(1);
    assert_eq!(h.wait_used(1, 1).len(), 1);
    assert_eq!(h.q(1).irq.read().unwrap(), 1);
    // used_event far ahead: no interrupt for the next frame.
    h.q(1).drv.set_used_event(100);
    h.tx_chain(&test_frame(2));
    h.kick(1);
    assert_eq!(h.wait_used(1, 1).len(), 1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        h.q(1).irq.read().is_err(),
        "interrupt sent although used_event says no"
    );
    let r = h.report();
    let txq = r
        .queues
        .iter()
        .find(|q| q.device == h.dev.name() && q.queue == 1)
        .unwrap();
    assert_eq!(
        (txq.counters.irqs_sent, txq.counters.irqs_suppressed),
        (1, 1)
    );
}

#[test]
fn test_tx_poll_window_sends_without_kick() {
    let Some(mut h) = harness("poll-us=500000", ACKED, &[0, 1]) else {
        return;
    };
    h.tx_chain(&test_frame(1));
    h.kick(1);
    assert_eq!(h.wait_used(1, 1).len(), 1);
    // Within the busy-poll window a frame goes out without a kick.
    h.tx_chain(&test_frame(2));
    assert_eq!(h.wait_used(1, 1).len(), 1);
    let r = h.report();
    let txq = r
        .queues
        .iter()
        .find(|q| q.device == h.dev.name() && q.queue == 1)
        .unwrap();
    assert!(txq.counters.poll_hits >= 1);
}
