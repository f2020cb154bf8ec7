//! The little network stack netbench needs: Ethernet, ARP, IPv4, ICMP echo
//! and UDP. Frame builders and one parser over plain byte slices; nothing
//! here touches a device, so all of it is unit-tested on the host.
//!
//! Frames are Ethernet II without FCS, padded to the 60-byte minimum.
//! Checksums are computed and checked here (netbench negotiates no offloads).

use core::fmt;

/// An Ethernet address.
pub type Mac = [u8; 6];
/// An IPv4 address, network byte order.
pub type Ip = [u8; 4];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_HLEN: usize = 14;
/// Shortest frame on the wire (without FCS); shorter frames are padded.
pub const ETH_MIN_FRAME: usize = 60;
/// Longest untagged frame with a 1500-byte MTU (without FCS).
pub const ETH_MAX_FRAME: usize = 1514;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const IPV4_HLEN: usize = 20;
pub const ICMP_HLEN: usize = 8;
pub const UDP_HLEN: usize = 8;
/// Largest ICMP echo or UDP payload in one frame with a 1500-byte MTU.
pub const MAX_PAYLOAD: usize = 1500 - IPV4_HLEN - 8;

const ARP_LEN: usize = 28;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const TTL: u8 = 64;
/// IPv4 flags/fragment word with Don't Fragment set.
const IP_DF: u16 = 0x4000;

/// Parses dotted-quad IPv4 (`10.0.2.15`).
pub fn parse_ip(s: &str) -> Option<Ip> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = u8::try_from(p.parse::<u16>().ok()?).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// Parses `52:54:00:12:34:56` (or with `-`).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// Is this an address a host may use as its own (not 0.0.0.0, broadcast,
/// multicast, loopback or class E)?
pub fn is_unicast_ip(ip: &Ip) -> bool {
    ip[0] != 0 && ip[0] != 127 && ip[0] < 224
}

/// Is this a usable station MAC (not multicast/broadcast, not all zeros)?
pub fn is_unicast_mac(mac: &Mac) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}

/// Formats an IPv4 address.
pub struct IpFmt(pub Ip);

impl fmt::Display for IpFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Formats an Ethernet address.
pub struct MacFmt(pub Mac);

impl fmt::Display for MacFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// One's-complement sum of big-endian 16-bit words (RFC 1071), not folded.
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum and complements it: the checksum field value.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data`. Over data that includes a correct
/// checksum field it is 0.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

fn pseudo_header_sum(src: &Ip, dst: &Ip, proto: u8, len: usize) -> u64 {
    sum16(src, 0) + sum16(dst, 0) + u64::from(proto) + len as u64
}

fn put16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn ip_at(buf: &[u8], at: usize) -> Ip {
    [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
}

fn mac_at(buf: &[u8], at: usize) -> Mac {
    [buf[at], buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4], buf[at + 5]]
}

/// Zero-pads a frame of `len` bytes to the Ethernet minimum; returns the length.
fn pad(buf: &mut [u8], len: usize) -> usize {
    if len < ETH_MIN_FRAME {
        buf[len..ETH_MIN_FRAME].fill(0);
        ETH_MIN_FRAME
    } else {
        len
    }
}

fn put_eth(buf: &mut [u8], dst: &Mac, src: &Mac, ethertype: u16) {
    buf[0..6].copy_from_slice(dst);
    buf[6..12].copy_from_slice(src);
    put16(buf, 12, ethertype);
}

/// The two ends of an IPv4 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ip,
    pub dst_ip: Ip,
}

/// Writes Ethernet + IPv4 headers for `payload_len` bytes of `proto`.
fn put_ipv4(buf: &mut [u8], r: &Route, proto: u8, payload_len: usize, ip_id: u16) {
    put_eth(buf, &r.dst_mac, &r.src_mac, ETHERTYPE_IPV4);
    let ip = &mut buf[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip, 2, (IPV4_HLEN + payload_len) as u16);
    put16(ip, 4, ip_id);
    put16(ip, 6, IP_DF);
    ip[8] = TTL;
    ip[9] = proto;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&r.src_ip);
    ip[16..20].copy_from_slice(&r.dst_ip);
    let c = checksum(ip);
    put16(ip, 10, c);
}

/// Fills `out` with netbench's payload pattern (byte i = i mod 256, as ping does after its timestamp).
pub fn fill_pattern(out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = i as u8;
    }
}

/// Builds an ARP request "who has `target_ip`? tell `src_ip`" (broadcast).
pub fn arp_request(buf: &mut [u8], src_mac: &Mac, src_ip: &Ip, target_ip: &Ip) -> usize {
    put_arp(buf, ARP_REQUEST, (&BROADCAST, &[0; 6]), src_mac, src_ip, target_ip)
}

/// Builds an ARP reply "`src_ip` is at `src_mac`" to `to_mac`/`to_ip`.
pub fn arp_reply(buf: &mut [u8], src_mac: &Mac, src_ip: &Ip, to_mac: &Mac, to_ip: &Ip) -> usize {
    put_arp(buf, ARP_REPLY, (to_mac, to_mac), src_mac, src_ip, to_ip)
}

fn put_arp(buf: &mut [u8], op: u16, (eth_dst, tha): (&Mac, &Mac), sha: &Mac, spa: &Ip, tpa: &Ip) -> usize {
    put_eth(buf, eth_dst, sha, ETHERTYPE_ARP);
    let a = &mut buf[ETH_HLEN..ETH_HLEN + ARP_LEN];
    put16(a, 0, 1); // Ethernet
    put16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, op);
    a[8..14].copy_from_slice(sha);
    a[14..18].copy_from_slice(spa);
    a[18..24].copy_from_slice(tha);
    a[24..28].copy_from_slice(tpa);
    pad(buf, ETH_HLEN + ARP_LEN)
}

/// Builds an ICMP echo request (`reply` false) or reply carrying `payload`.
/// `buf` must hold the frame (`42 + payload.len()`, at least 60 bytes).
pub fn icmp_echo(buf: &mut [u8], r: &Route, reply: bool, id: u16, seq: u16, ip_id: u16, payload: &[u8]) -> usize {
    let icmp_len = ICMP_HLEN + payload.len();
    put_ipv4(buf, r, PROTO_ICMP, icmp_len, ip_id);
    let at = ETH_HLEN + IPV4_HLEN;
    let icmp = &mut buf[at..at + icmp_len];
    icmp[0] = if reply { ICMP_ECHO_REPLY } else { ICMP_ECHO_REQUEST };
    icmp[1] = 0;
    put16(icmp, 2, 0);
    put16(icmp, 4, id);
    put16(icmp, 6, seq);
    icmp[ICMP_HLEN..].copy_from_slice(payload);
    let c = checksum(icmp);
    put16(icmp, 2, c);
    pad(buf, at + icmp_len)
}

/// Builds a UDP datagram carrying `payload`, with its checksum.
pub fn udp(buf: &mut [u8], r: &Route, sport: u16, dport: u16, ip_id: u16, payload: &[u8]) -> usize {
    let udp_len = UDP_HLEN + payload.len();
    put_ipv4(buf, r, PROTO_UDP, udp_len, ip_id);
    let at = ETH_HLEN + IPV4_HLEN;
    let u = &mut buf[at..at + udp_len];
    put16(u, 0, sport);
    put16(u, 2, dport);
    put16(u, 4, udp_len as u16);
    put16(u, 6, 0);
    u[UDP_HLEN..].copy_from_slice(payload);
    let mut c = fold(sum16(u, pseudo_header_sum(&r.src_ip, &r.dst_ip, PROTO_UDP, udp_len)));
    if c == 0 {
        c = 0xffff; // 0 means "no checksum" in UDP over IPv4
    }
    put16(u, 6, c);
    pad(buf, at + udp_len)
}

/// What a received frame is, as far as netbench cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rx<'a> {
    /// "Who has `my_ip`?"
    ArpRequest { sender_mac: Mac, sender_ip: Ip },
    /// An ARP reply addressed to us.
    ArpReply { sender_mac: Mac, sender_ip: Ip },
    /// Any other ARP packet (requests for other hosts, gratuitous ARP).
    ArpOther,
    /// ICMP echo request to `my_ip`; `payload` is what the reply must carry.
    EchoRequest { src_mac: Mac, src_ip: Ip, id: u16, seq: u16, payload: &'a [u8] },
    /// ICMP echo reply to `my_ip`.
    EchoReply { src_ip: Ip, id: u16, seq: u16 },
    /// Other ICMP to `my_ip` (port unreachable after a UDP flood, ...).
    IcmpOther,
    /// Well-formed but not for us or not handled: other destinations,
    /// IPv6, UDP/TCP, fragments.
    Other,
    /// Malformed: truncated, a bad IPv4 or ICMP checksum, bad lengths.
    Bad,
}

/// Classifies `frame` (Ethernet header first, no virtio header, no FCS).
pub fn parse<'a>(frame: &'a [u8], my_mac: &Mac, my_ip: &Ip) -> Rx<'a> {
    if frame.len() < ETH_HLEN {
        return Rx::Bad;
    }
    let dst = mac_at(frame, 0);
    if dst != *my_mac && dst != BROADCAST {
        return Rx::Other;
    }
    match get16(frame, 12) {
        ETHERTYPE_ARP => parse_arp(&frame[ETH_HLEN..], my_ip),
        ETHERTYPE_IPV4 => parse_ipv4(frame, my_ip),
        _ => Rx::Other,
    }
}

fn parse_arp(a: &[u8], my_ip: &Ip) -> Rx<'static> {
    if a.len() < ARP_LEN {
        return Rx::Bad;
    }
    if get16(a, 0) != 1 || get16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
        return Rx::ArpOther;
    }
    let sender_mac = mac_at(a, 8);
    let sender_ip = ip_at(a, 14);
    let target_ip = ip_at(a, 24);
    match get16(a, 6) {
        ARP_REQUEST if target_ip == *my_ip && sender_ip != *my_ip => Rx::ArpRequest { sender_mac, sender_ip },
        ARP_REPLY if target_ip == *my_ip => Rx::ArpReply { sender_mac, sender_ip },
        _ => Rx::ArpOther,
    }
}

fn parse_ipv4<'a>(frame: &'a [u8], my_ip: &Ip) -> Rx<'a> {
    let ip = &frame[ETH_HLEN..];
    if ip.len() < IPV4_HLEN || ip[0] >> 4 != 4 {
        return Rx::Bad;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(get16(ip, 2));
    if ihl < IPV4_HLEN || total < ihl || total > ip.len() {
        return Rx::Bad;
    }
    if checksum(&ip[..ihl]) != 0 {
        return Rx::Bad;
    }
    if ip_at(ip, 16) != *my_ip {
        return Rx::Other;
    }
    // Fragments (MF set or a non-zero offset) are not reassembled.
    if get16(ip, 6) & 0x3fff != 0 {
        return Rx::Other;
    }
    if ip[9] != PROTO_ICMP {
        return Rx::Other;
    }
    let src_ip = ip_at(ip, 12);
    let icmp = &ip[ihl..total];
    if icmp.len() < ICMP_HLEN || checksum(icmp) != 0 {
        return Rx::Bad;
    }
    let (id, seq) = (get16(icmp, 4), get16(icmp, 6));
    match (icmp[0], icmp[1]) {
        (ICMP_ECHO_REQUEST, 0) => {
            Rx::EchoRequest { src_mac: mac_at(frame, 6), src_ip, id, seq, payload: &icmp[ICMP_HLEN..] }
        }
        (ICMP_ECHO_REPLY, 0) => Rx::EchoReply { src_ip, id, seq },
        _ => Rx::IcmpOther,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const B_MAC: Mac = [0x02, 0, 0, 0, 0, 1];
    const A_IP: Ip = [10, 0, 2, 15];
    const B_IP: Ip = [10, 0, 2, 2];

    fn a_to_b() -> Route {
        Route { src_mac: A_MAC, dst_mac: B_MAC, src_ip: A_IP, dst_ip: B_IP }
    }

    #[test]
    fn test_parse_ip_and_mac_accept_canonical_reject_malformed() {
        assert_eq!(parse_ip("10.0.2.15"), Some([10, 0, 2, 15]));
        assert_eq!(parse_ip("255.255.255.255"), Some([255; 4]));
        for bad in ["", "10.0.2", "10.0.2.15.1", "10.0.2.256", "10..2.1", "a.b.c.d", "1.2.3.-4", "0010.0.0.1"] {
            assert_eq!(parse_ip(bad), None, "{bad}");
        }
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some(A_MAC));
        assert_eq!(parse_mac("52-54-00-12-34-56"), Some(A_MAC));
        for bad in ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "5:54:00:12:34:56", "zz:54:00:12:34:56"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert!(is_unicast_mac(&A_MAC));
        assert!(!is_unicast_mac(&BROADCAST));
        assert!(!is_unicast_mac(&[1, 0, 0x5e, 0, 0, 1]));
        assert!(is_unicast_ip(&A_IP));
        assert!(!is_unicast_ip(&[0, 0, 0, 0]) && !is_unicast_ip(&[224, 0, 0, 1]) && !is_unicast_ip(&[127, 0, 0, 1]));
    }

    #[test]
    fn test_checksum_rfc1071_example_and_odd_length() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
        // An odd trailing byte is padded with zero on the right.
        assert_eq!(checksum(&[0x12]), !0x1200);
    }

    #[test]
    fn test_icmp_echo_request_parses_back_at_the_receiver() {
        let mut payload = [0u8; 56];
        fill_pattern(&mut payload);
        let mut buf = [0u8; ETH_MAX_FRAME];
        let len = icmp_echo(&mut buf, &a_to_b(), false, 0x5256, 7, 1, &payload);
        assert_eq!(len, ETH_HLEN + IPV4_HLEN + ICMP_HLEN + 56);
        match parse(&buf[..len], &B_MAC, &B_IP) {
            Rx::EchoRequest { src_mac, src_ip, id, seq, payload: p } => {
                assert_eq!((src_mac, src_ip, id, seq), (A_MAC, A_IP, 0x5256, 7));
                assert_eq!(p, &payload[..]);
            }
            other => panic!("{other:?}"),
        }
        // Not for a different IP or MAC.
        assert_eq!(parse(&buf[..len], &B_MAC, &[10, 0, 2, 3]), Rx::Other);
        assert_eq!(parse(&buf[..len], &[2, 0, 0, 0, 0, 9], &B_IP), Rx::Other);
    }

    #[test]
    fn test_icmp_echo_reply_short_payload_is_padded_and_parses() {
        let mut buf = [0xaau8; ETH_MAX_FRAME];
        let len = icmp_echo(&mut buf, &a_to_b(), true, 1, 65535, 9, &[]);
        assert_eq!(len, ETH_MIN_FRAME);
        assert!(buf[42..60].iter().all(|&b| b == 0));
        assert_eq!(parse(&buf[..len], &B_MAC, &B_IP), Rx::EchoReply { src_ip: A_IP, id: 1, seq: 65535 });
    }

    #[test]
    fn test_corrupted_ip_or_icmp_byte_is_bad() {
        let mut buf = [0u8; ETH_MAX_FRAME];
        let len = icmp_echo(&mut buf, &a_to_b(), false, 1, 1, 1, &[1, 2, 3, 4]);
        let mut ip_bad = buf;
        ip_bad[ETH_HLEN + 8] ^= 1; // TTL
        assert_eq!(parse(&ip_bad[..len], &B_MAC, &B_IP), Rx::Bad);
        let mut icmp_bad = buf;
        icmp_bad[ETH_HLEN + IPV4_HLEN + ICMP_HLEN] ^= 0x40;
        assert_eq!(parse(&icmp_bad[..len], &B_MAC, &B_IP), Rx::Bad);
        assert_eq!(parse(&buf[..10], &B_MAC, &B_IP), Rx::Bad);
        // Truncated below the IPv4 total length.
        assert_eq!(parse(&buf[..ETH_HLEN + IPV4_HLEN + 4], &B_MAC, &B_IP), Rx::Bad);
    }

    #[test]
    fn test_arp_request_and_reply_round_trip() {
        let mut buf = [0u8; ETH_MAX_FRAME];
        let len = arp_request(&mut buf, &A_MAC, &A_IP, &B_IP);
        assert_eq!(len, ETH_MIN_FRAME);
        assert_eq!(&buf[0..6], &BROADCAST);
        assert_eq!(parse(&buf[..len], &B_MAC, &B_IP), Rx::ArpRequest { sender_mac: A_MAC, sender_ip: A_IP });
        // Someone else's request is only counted.
        assert_eq!(parse(&buf[..len], &B_MAC, &[10, 0, 2, 99]), Rx::ArpOther);
        let len = arp_reply(&mut buf, &B_MAC, &B_IP, &A_MAC, &A_IP);
        assert_eq!(&buf[0..6], &A_MAC);
        assert_eq!(parse(&buf[..len], &A_MAC, &A_IP), Rx::ArpReply { sender_mac: B_MAC, sender_ip: B_IP });
    }

    #[test]
    fn test_udp_checksum_verifies_with_pseudo_header() {
        let mut payload = [0u8; 64];
        fill_pattern(&mut payload);
        let mut buf = [0u8; ETH_MAX_FRAME];
        let len = udp(&mut buf, &a_to_b(), 40000, 9, 3, &payload);
        assert_eq!(len, ETH_HLEN + IPV4_HLEN + UDP_HLEN + 64);
        let ip = &buf[ETH_HLEN..len];
        assert_eq!(checksum(&ip[..IPV4_HLEN]), 0);
        let u = &ip[IPV4_HLEN..];
        assert_eq!(fold(sum16(u, pseudo_header_sum(&A_IP, &B_IP, PROTO_UDP, u.len()))), 0);
        assert_eq!(get16(u, 0), 40000);
        assert_eq!(get16(u, 2), 9);
        // UDP is not handled by the parser: well-formed, for us, "other".
        assert_eq!(parse(&buf[..len], &B_MAC, &B_IP), Rx::Other);
    }

    #[test]
    fn test_fragment_and_ipv6_are_other() {
        let mut buf = [0u8; ETH_MAX_FRAME];
        let len = icmp_echo(&mut buf, &a_to_b(), false, 1, 1, 1, &[0; 8]);
        let mut frag = buf;
        frag[ETH_HLEN + 6] = 0x20; // MF
        frag[ETH_HLEN + 10] = 0;
        frag[ETH_HLEN + 11] = 0;
        let c = checksum(&frag[ETH_HLEN..ETH_HLEN + IPV4_HLEN]);
        frag[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse(&frag[..len], &B_MAC, &B_IP), Rx::Other);
        let mut v6 = buf;
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(parse(&v6[..len], &B_MAC, &B_IP), Rx::Other);
    }
}
