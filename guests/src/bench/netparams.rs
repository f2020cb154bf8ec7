//! netbench command-line parameters: parsing and the checks that need no device.

use crate::cmdline;
use crate::netproto::{self, Ip, Mac, MAX_PAYLOAD};

/// What netbench does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// ICMP echo requests to the peer, one at a time; RTT histogram.
    Ping,
    /// UDP datagrams to the peer back to back; packets/s sent.
    Flood,
    /// Only answer ARP and ICMP echo requests (the far end of a guest-to-guest ping).
    Echo,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ping => "ping",
            Mode::Flood => "flood",
            Mode::Echo => "echo",
        }
    }
}

/// Validated parameters.
#[derive(Clone, Copy, Debug)]
pub struct NetParams {
    pub mode: Mode,
    pub ip: Ip,
    pub peer: Ip,
    /// Overrides the device's MAC.
    pub mac: Option<Mac>,
    /// ping: echo requests; flood: datagrams; echo: requests answered.
    /// `None`: bounded by `runtime_ns` only.
    pub count: Option<u64>,
    /// `None`: bounded by `count` only.
    pub runtime_ns: Option<u64>,
    /// ping: time from one request to the next (0: right after the reply).
    pub interval_ns: u64,
    /// ICMP or UDP payload bytes.
    pub size: usize,
    /// UDP destination port.
    pub port: u16,
    /// ping: a reply later than this is lost.
    pub timeout_ns: u64,
    pub tsc_khz: Option<u64>,
    /// Queue size (power of two, 16..=1024, ≤ the device's maximum); `None` = device max, capped.
    pub qsize: Option<u16>,
    /// Bytes per receive buffer (`rxbuf=`, 256..=2048): smaller than a frame, the device
    /// spreads frames over several buffers (MRG_RXBUF).
    pub rx_buf: u32,
}

pub const DEFAULT_IP: Ip = [10, 0, 2, 15];
pub const DEFAULT_PEER: Ip = [10, 0, 2, 2];
pub const DEFAULT_COUNT: u64 = 100;
pub const DEFAULT_INTERVAL_US: u64 = 1000;
pub const DEFAULT_PING_SIZE: usize = 56;
pub const DEFAULT_UDP_SIZE: usize = 64;
pub const DEFAULT_PORT: u16 = 9;
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// flood without count/runtime.
pub const DEFAULT_FLOOD_RUNTIME_NS: u64 = 5_000_000_000;
/// echo without count/runtime.
pub const DEFAULT_ECHO_RUNTIME_NS: u64 = 10_000_000_000;
/// Largest queue the driver sets up (2 KiB of buffer per descriptor).
pub const MAX_QSIZE: u64 = 1024;
/// Receive buffer sizes accepted (`rxbuf=`); the largest is the default.
pub const RX_BUF_MIN: u64 = 256;
pub const RX_BUF_MAX: u32 = 2048;
/// Longest interval and timeout accepted (1 minute).
const MAX_WAIT_NS: u64 = 60_000_000_000;

/// A parameter that cannot be used, with the reason.
#[derive(Debug)]
pub struct ParamError<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub reason: &'static str,
}

impl NetParams {
    /// Parses `key=value` words; unknown keys and malformed values are errors.
    pub fn parse(cmd: &str) -> Result<NetParams, ParamError<'_>> {
        let mut p = NetParams {
            mode: Mode::Ping,
            ip: DEFAULT_IP,
            peer: DEFAULT_PEER,
            mac: None,
            count: None,
            runtime_ns: None,
            interval_ns: DEFAULT_INTERVAL_US * 1000,
            size: 0,
            port: DEFAULT_PORT,
            timeout_ns: DEFAULT_TIMEOUT_MS * 1_000_000,
            tsc_khz: None,
            qsize: None,
            rx_buf: RX_BUF_MAX,
        };
        let mut size = None;
        let mut peer_given = None;
        for (key, value) in cmdline::pairs(cmd) {
            let bad = |reason| ParamError { key, value, reason };
            let num = || cmdline::parse_u64(value).ok_or(bad("not a number"));
            match key {
                "mode" => {
                    p.mode = match value {
                        "ping" => Mode::Ping,
                        "flood" => Mode::Flood,
                        "echo" => Mode::Echo,
                        _ => return Err(bad("expected ping, flood or echo")),
                    }
                }
                "ip" => {
                    p.ip = netproto::parse_ip(value).ok_or(bad("not an IPv4 address"))?;
                    if !netproto::is_unicast_ip(&p.ip) {
                        return Err(bad("not a unicast address"));
                    }
                }
                "peer" => {
                    p.peer = netproto::parse_ip(value).ok_or(bad("not an IPv4 address"))?;
                    if !netproto::is_unicast_ip(&p.peer) {
                        return Err(bad("not a unicast address"));
                    }
                    peer_given = Some(value);
                }
                "mac" => {
                    let mac = netproto::parse_mac(value).ok_or(bad("not a MAC address (52:54:00:12:34:56)"))?;
                    if !netproto::is_unicast_mac(&mac) {
                        return Err(bad("multicast or all-zero MAC"));
                    }
                    p.mac = Some(mac);
                }
                "count" => {
                    let n = num()?;
                    if n == 0 {
                        return Err(bad("must be positive"));
                    }
                    p.count = Some(n);
                }
                "runtime" => {
                    let ns = cmdline::parse_duration_ns(value).ok_or(bad("not a duration"))?;
                    if ns == 0 {
                        return Err(bad("must be positive"));
                    }
                    p.runtime_ns = Some(ns);
                }
                "interval_us" => {
                    let us = num()?;
                    if us > MAX_WAIT_NS / 1000 {
                        return Err(bad("longer than 60 s"));
                    }
                    p.interval_ns = us * 1000;
                }
                "size" => {
                    let n = num()?;
                    if n > MAX_PAYLOAD as u64 {
                        return Err(bad("payload larger than 1472 bytes (one 1500-byte MTU frame)"));
                    }
                    size = Some(n as usize);
                }
                "port" => {
                    let n = num()?;
                    if n == 0 || n > 65535 {
                        return Err(bad("must be 1..65535"));
                    }
                    p.port = n as u16;
                }
                "timeout_ms" => {
                    let ms = num()?;
                    if ms == 0 || ms > MAX_WAIT_NS / 1_000_000 {
                        return Err(bad("must be 1..60000"));
                    }
                    p.timeout_ns = ms * 1_000_000;
                }
                "tsc_khz" => {
                    let khz = num()?;
                    if !(1000..=100_000_000).contains(&khz) {
                        return Err(bad("must be 1000..100000000"));
                    }
                    p.tsc_khz = Some(khz);
                }
                "qsize" => {
                    let n = num()?;
                    if !(16..=MAX_QSIZE).contains(&n) || !n.is_power_of_two() {
                        return Err(bad("must be a power of two, 16..1024"));
                    }
                    p.qsize = Some(n as u16);
                }
                "rxbuf" => {
                    let n = num()?;
                    if !(RX_BUF_MIN..=u64::from(RX_BUF_MAX)).contains(&n) {
                        return Err(bad("must be 256..2048"));
                    }
                    p.rx_buf = n as u32;
                }
                _ => return Err(ParamError { key, value, reason: "unknown parameter" }),
            }
        }
        if p.peer == p.ip {
            return Err(ParamError { key: "peer", value: peer_given.unwrap_or("10.0.2.2"), reason: "same as ip" });
        }
        p.size = size.unwrap_or(if p.mode == Mode::Flood { DEFAULT_UDP_SIZE } else { DEFAULT_PING_SIZE });
        // Neither count nor runtime: ping sends 100 requests, the others run for a while.
        if p.count.is_none() && p.runtime_ns.is_none() {
            match p.mode {
                Mode::Ping => p.count = Some(DEFAULT_COUNT),
                Mode::Flood => p.runtime_ns = Some(DEFAULT_FLOOD_RUNTIME_NS),
                Mode::Echo => p.runtime_ns = Some(DEFAULT_ECHO_RUNTIME_NS),
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_empty_cmdline_gives_ping_defaults() {
        let p = NetParams::parse("").unwrap();
        assert_eq!(p.mode, Mode::Ping);
        assert_eq!((p.ip, p.peer, p.mac), (DEFAULT_IP, DEFAULT_PEER, None));
        assert_eq!((p.count, p.runtime_ns), (Some(100), None));
        assert_eq!((p.interval_ns, p.size, p.port, p.timeout_ns), (1_000_000, 56, 9, 1_000_000_000));
    }

    #[test]
    fn test_parse_mode_defaults_size_and_runtime() {
        let p = NetParams::parse("mode=flood").unwrap();
        assert_eq!((p.size, p.count, p.runtime_ns), (64, None, Some(5_000_000_000)));
        let p = NetParams::parse("mode=echo").unwrap();
        assert_eq!((p.size, p.count, p.runtime_ns), (56, None, Some(10_000_000_000)));
        let p = NetParams::parse("mode=ping runtime=2").unwrap();
        assert_eq!((p.count, p.runtime_ns), (None, Some(2_000_000_000)));
        let p = NetParams::parse("mode=echo count=5").unwrap();
        assert_eq!((p.count, p.runtime_ns), (Some(5), None));
    }

    #[test]
    fn test_parse_full_cmdline_reads_every_key() {
        let p = NetParams::parse(
            "mode=flood ip=10.213.0.2 peer=10.213.0.1 mac=02:00:00:00:00:01 count=1000 runtime=250ms interval_us=0 size=1472 port=5001 timeout_ms=50 tsc_khz=2000000 qsize=512",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Flood);
        assert_eq!((p.ip, p.peer), ([10, 213, 0, 2], [10, 213, 0, 1]));
        assert_eq!(p.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!((p.count, p.runtime_ns, p.interval_ns), (Some(1000), Some(250_000_000), 0));
        assert_eq!((p.size, p.port, p.timeout_ns), (1472, 5001, 50_000_000));
        assert_eq!((p.tsc_khz, p.qsize), (Some(2_000_000), Some(512)));
    }

    #[test]
    fn test_parse_bad_values_name_the_parameter() {
        for (cmd, key) in [
            ("mode=pong", "mode"),
            ("ip=10.0.2", "ip"),
            ("ip=224.0.0.1", "ip"),
            ("peer=300.1.1.1", "peer"),
            ("peer=10.0.2.15", "peer"),
            ("ip=10.0.0.1 peer=10.0.0.1", "peer"),
            ("mac=ff:ff:ff:ff:ff:ff", "mac"),
            ("mac=01:00:5e:00:00:01", "mac"),
            ("mac=52:54:00", "mac"),
            ("count=0", "count"),
            ("count=x", "count"),
            ("runtime=0", "runtime"),
            ("runtime=abc", "runtime"),
            ("interval_us=-1", "interval_us"),
            ("interval_us=61000000", "interval_us"),
            ("size=1473", "size"),
            ("port=0", "port"),
            ("port=65536", "port"),
            ("timeout_ms=0", "timeout_ms"),
            ("tsc_khz=5", "tsc_khz"),
            ("qsize=100", "qsize"),
            ("qsize=8", "qsize"),
            ("qsize=2048", "qsize"),
            ("rxbuf=255", "rxbuf"),
            ("rxbuf=2049", "rxbuf"),
            ("bs=4k", "bs"),
            ("nokey", "nokey"),
        ] {
            let e = NetParams::parse(cmd).unwrap_err();
            assert_eq!(e.key, key, "{cmd}");
        }
    }
}
