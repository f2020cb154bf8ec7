//! Receiving frames over several MRG_RXBUF buffers (rx.rs): the host sends UDP datagrams
//! into a tap with a 9000-byte MTU, the synthetic driver posts small buffers and rebuilds
//! each frame from its used entries, as Linux's `receive_mergeable` does.

use std::net::UdpSocket;

use super::*;

const PORT: u16 = 4789;
const MTU_OPTS: &str = "mtu=9000";
/// Ethernet + IPv4 + UDP headers before the payload.
const HDRS: usize = 14 + 20 + 8;

/// A received frame: `num_buffers` from its header, the used lengths and the bytes after
/// the virtio-net header, joined across its buffers.
#[derive(Debug)]
struct Frame {
    num_buffers: u16,
    gso_type: u8,
    gso_size: u16,
    lens: Vec<u32>,
    data: Vec<u8>,
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

struct Peer {
    sock: UdpSocket,
    dst: String,
}

/// A host socket that sends to the "guest" (a static neighbour entry: no ARP).
fn peer(h: &Harness) -> Peer {
    static_neighbour(h);
    Peer {
        sock: UdpSocket::bind(format!("10.213.{}.1:0", h.subnet)).unwrap(),
        dst: format!("10.213.{}.2:{PORT}", h.subnet),
    }
}

impl Peer {
    fn send(&self, data: &[u8]) {
        self.sock.send_to(data, &self.dst).unwrap();
    }
}

impl Harness {
    /// Posts `n` one-descriptor RX buffers of `len` bytes; returns head → address.
    fn post_rx(&mut self, n: usize, len: u32) -> Vec<(u16, GuestAddress)> {
        let bufs = self.rx_bufs(n, len);
        self.kick(0);
        bufs
    }

    /// Waits for `want` UDP frames to our port and rebuilds them from the used ring; other
    /// frames are skipped.
    fn frames(&mut self, bufs: &[(u16, GuestAddress)], want: usize) -> Vec<Frame> {
        self.frames_of(bufs, want, 17)
    }

    /// Like [`frames`](Self::frames), for IPv4 protocol `proto` (UDP 17, TCP 6).
    fn frames_of(&mut self, bufs: &[(u16, GuestAddress)], want: usize, proto: u8) -> Vec<Frame> {
        let mut used = std::collections::VecDeque::new();
        let mut out = Vec::new();
        let t = Instant::now();
        while out.len() < want && t.elapsed() < WAIT {
            used.extend(self.q(0).drv.take_used());
            let Some(&(head, len)) = used.front() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            let addr = |h: u32| bufs.iter().find(|b| u32::from(b.0) == h).unwrap().1;
            let mut hdr = [0u8; 12];
            assert!(len >= 12, "used entry of {len} bytes");
            self.q(0).drv.mem.read_slice(&mut hdr, addr(head)).unwrap();
            let vh = VnetHdr::from_bytes(&hdr);
            let nb = vh.num_buffers;
            assert!(nb >= 1, "num_buffers 0");
            if used.len() < usize::from(nb) {
                // The device publishes a frame's entries together: they must all be there.
                panic!("{} of {nb} used entries of a frame visible", used.len());
            }
            let mut f = Frame {
                num_buffers: nb,
                gso_type: vh.gso_type,
                gso_size: vh.gso_size,
                lens: Vec::new(),
                data: Vec::new(),
            };
            for i in 0..nb {
                let (h, l) = used.pop_front().unwrap();
                let mut b = vec![0u8; l as usize];
                self.q(0).drv.mem.read_slice(&mut b, addr(h)).unwrap();
                f.data
                    .extend_from_slice(if i == 0 { &b[12..] } else { &b[..] });
                f.lens.push(l);
            }
            let udp = f.data.len() >= HDRS
                && f.data[12..14] == [8, 0]
                && f.data[23] == proto
                && f.data[36..38] == PORT.to_be_bytes();
            if udp {
                out.push(f);
            }
        }
        out
    }
}

#[test]
fn test_rx_mrg_frames_span_one_two_and_many_buffers_in_order() {
    let Some(mut h) = harness(MTU_OPTS, ACKED, &[0, 1]) else {
        return;
    };
    let p = peer(&h);
    let bufs = h.post_rx(60, 512);
    // 1 buffer, 2 buffers, and 8000 bytes: 16 buffers of 512.
    let sizes = [100usize, 700, 8000];
    for (i, &n) in sizes.iter().enumerate() {
        p.send(&payload(n, i as u8));
    }
    let mut frames = h.frames(&bufs, sizes.len());
    assert_eq!(frames.len(), sizes.len(), "{frames:?}");
    // Reads complete in any order; the frames are told apart by their size.
    frames.sort_by_key(|f| f.data.len());
    for (i, (f, &n)) in frames.iter().zip(&sizes).enumerate() {
        let total = 12 + HDRS + n;
        let k = total.div_ceil(512);
        assert_eq!(usize::from(f.num_buffers), k, "frame {i}");
        let mut want_lens = vec![512u32; k];
        want_lens[k - 1] = (total - 512 * (k - 1)) as u32;
        assert_eq!(f.lens, want_lens, "frame {i}");
        assert_eq!(f.data[HDRS..], payload(n, i as u8)[..], "frame {i} payload");
    }
    let c = h.rx_counters();
    assert_eq!(c.errors, 0);
    assert!(c.reads >= 3);
}

#[test]
fn test_rx_mrg_exact_fit_received_one_more_byte_dropped_and_counted() {
    let Some(mut h) = harness(MTU_OPTS, ACKED, &[0, 1]) else {
        return;
    };
    let p = peer(&h);
    // Too few buffers for a 9000-byte frame: the read is posted with the 2048 bytes there are.
    let bufs = h.post_rx(4, 512);
    let exact = 4 * 512 - 12 - HDRS;
    p.send(&payload(exact, 1));
    let f = h.frames(&bufs, 1);
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].num_buffers, &f[0].lens[..]), (4, &[512u32; 4][..]));
    assert_eq!(f[0].data[HDRS..], payload(exact, 1)[..]);
    assert_eq!(h.rx_counters().errors, 0);

    let mut bufs = h.post_rx(4, 512);
    p.send(&payload(exact + 1, 2));
    let t = Instant::now();
    while h.rx_counters().errors == 0 && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        h.rx_counters().errors,
        1,
        "the truncated frame was not counted"
    );
    assert!(
        h.q(0).drv.take_used().is_empty(),
        "a truncated frame reached the guest"
    );
    // The buffers stay posted: a frame that fits arrives in them.
    p.send(&payload(30, 3));
    let f = h.frames(&bufs, 1);
    assert_eq!((f.len(), f[0].num_buffers), (1, 1));
    assert_eq!(f[0].data[HDRS..], payload(30, 3)[..]);
    // More buffers: the rest of the reserve and the new ones make full reads again.
    bufs.extend(h.post_rx(20, 512));
    p.send(&payload(8000, 4));
    let f = h.frames(&bufs, 1);
    assert_eq!(f.len(), 1);
    assert_eq!(
        usize::from(f[0].num_buffers),
        (12 + HDRS + 8000).div_ceil(512)
    );
    assert_eq!(f[0].data[HDRS..], payload(8000, 4)[..]);
}

#[test]
fn test_rx_mrg_reset_returns_posted_and_reserved_chains_once() {
    let Some(mut h) = harness(MTU_OPTS, ACKED, &[0, 1]) else {
        return;
    };
    // 18 buffers of 512 hold a 9030-byte read: 2 reads posted, 4 chains in the reserve.
    let bufs = h.post_rx(40, 512);
    std::thread::sleep(Duration::from_millis(100));
    h.dev.reset();
    let used = h.q(0).drv.take_used();
    let mut heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    heads.sort();
    let mut want: Vec<u32> = bufs.iter().map(|b| u32::from(b.0)).collect();
    want.sort();
    assert_eq!(heads, want, "every chain back exactly once");
    assert!(used.iter().all(|u| u.1 == 0), "{used:?}");
}

#[test]
fn test_rx_without_mrg_large_frame_dropped_small_buffer_kept() {
    let Some(mut h) = harness(MTU_OPTS, ACKED & !f::MRG_RXBUF, &[0, 1]) else {
        return;
    };
    let p = peer(&h);
    let bufs = h.post_rx(20, 512);
    p.send(&payload(2000, 5));
    let t = Instant::now();
    while h.rx_counters().errors == 0 && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(h.rx_counters().errors >= 1);
    p.send(&payload(40, 6));
    let f = h.frames(&bufs, 1);
    assert_eq!((f.len(), f[0].num_buffers), (1, 1));
}

/// The driver hands each buffer back after its frame, as netbench and Linux do; then the
/// device resets. Returns the heads the reset gave back.
fn recycle_then_reset(acked: u64) -> Option<Vec<u32>> {
    let mut h = harness(MTU_OPTS, acked, &[0, 1])?;
    let p = peer(&h);
    let bufs = h.post_rx(100, 1526);
    for i in 0..40u8 {
        p.send(&payload(64, i));
        let f = h.wait_used(0, 1);
        assert_eq!(f.len(), 1, "frame {i}: {:?}", h.rx_counters());
        let hdr = GuestAddress(bufs.iter().find(|b| u32::from(b.0) == f[0].0).unwrap().1 .0 + 10);
        assert_eq!(h.q(0).drv.mem.read_obj::<u16>(hdr).unwrap(), 1, "frame {i}");
        h.q(0).drv.publish(f[0].0 as u16);
        h.kick(0);
    }
    assert_eq!(h.rx_counters().errors, 0);
    h.dev.reset();
    let mut heads: Vec<u32> = h.q(0).drv.take_used().into_iter().map(|u| u.0).collect();
    heads.sort();
    Some(heads)
}

#[test]
fn test_rx_mrg_recycled_buffers_keep_receiving() {
    let Some(heads) = recycle_then_reset(ACKED | F_RING_EVENT_IDX) else {
        return;
    };
    assert_eq!(heads.len(), 100, "every buffer back once at reset");
    heads.windows(2).for_each(|w| assert_ne!(w[0], w[1]));
}

#[test]
fn test_rx_mrg_with_gso_reads_span_64k_small_frames_still_one_buffer() {
    // GUEST_TSO4: each read holds 43 buffers of 1526 bytes (a 64 KiB frame); small frames
    // still take one, and the others stay with the device until the reset gives them back.
    let acked = ACKED | F_RING_EVENT_IDX | f::GUEST_CSUM | f::GUEST_TSO4;
    let Some(heads) = recycle_then_reset(acked) else {
        return;
    };
    assert_eq!(heads.len(), 100, "every buffer back once at reset");
    heads.windows(2).for_each(|w| assert_ne!(w[0], w[1]));
}

/// One's-complement sum of `b` (for the IPv4 header checksum).
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s >> 16) + (s & 0xffff);
    }
    !(s as u16)
}

/// A TCP/IPv4 segment of `data` to PORT, as the host's stack hands one to a device with TSO:
/// one frame, a virtio-net header (10 bytes, as packet sockets take it) asking for
/// segmentation into 1448-byte segments and a partial checksum.
fn gso_frame(subnet: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    // flags NEEDS_CSUM, gso_type TCPV4, hdr_len, gso_size, csum_start, csum_offset.
    f.push(1u8);
    f.push(1u8);
    for v in [54u16, 1448, 34, 16] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x77, 0x02, 0, 0, 0, 0, 1, 8, 0]);
    let total = (20 + 20 + data.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[10, 213, subnet, 1, 10, 213, subnet, 2]);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(data);
    f
}

/// Sends `frame` (virtio-net header first) out of the host's side of `tap` through an
/// AF_PACKET socket with PACKET_VNET_HDR: the kernel keeps it one GSO frame when the tap
/// takes TSO4. `None` where such a socket cannot be made.
fn send_on_tap(tap: &str, frame: &[u8]) -> Option<()> {
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: a NUL-terminated name; returns 0 when there is no such interface.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 || ifindex == 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let one: libc::c_int = 1;
    // SAFETY: the option value is a c_int that outlives the call, its size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = 0x0800u16.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size given; `frame` outlives the call.
    let n = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        n,
        frame.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
    Some(())
}

#[test]
fn test_rx_mrg_gso_frame_reaches_guest_whole_over_many_buffers() {
    // GUEST_TSO4 acknowledged: the tap takes TSO4, so a 20,000-byte TCP segment the host
    // hands it stays one frame, spread over 2 KiB buffers with its GSO header kept.
    let acked = ACKED | F_RING_EVENT_IDX | f::GUEST_CSUM | f::GUEST_TSO4;
    let Some(mut h) = harness("", acked, &[0, 1]) else {
        return;
    };
    let bufs = h.post_rx(120, 2048);
    let data = payload(20_000, 9);
    let frame = gso_frame(h.subnet, &data);
    let tap = h.dev.tap().name().to_string();
    if send_on_tap(&tap, &frame).is_none() {
        eprintln!("SKIP: no packet socket on {tap}");
        return;
    }
    let f = h.frames_of(&bufs, 1, 6);
    assert_eq!(f.len(), 1, "no frame: {:?}", h.rx_counters());
    let f = &f[0];
    let len = 14 + 20 + 20 + data.len();
    assert_eq!(f.data.len(), len);
    assert_eq!(usize::from(f.num_buffers), (12 + len).div_ceil(2048));
    assert_eq!(
        (f.gso_type, f.gso_size),
        (1, 1448),
        "the GSO header reaches the guest"
    );
    assert_eq!(&f.data[54..], &data[..]);
    assert_eq!(h.rx_counters().errors, 0);
}
