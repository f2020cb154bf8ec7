//! Net options (`--net tap=NAME,queues=2,...`), feature bits and the virtio-net
//! configuration space.

use std::str::FromStr;

use crate::devices::virtio::{parse_index_list, split_options};

/// virtio-net feature bits (virtio 1.2, 5.1.3), as masks of `virtio_bindings`' bit numbers.
pub mod features {
    use virtio_bindings::virtio_net::*;

    pub const CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM;
    pub const MTU: u64 = 1 << VIRTIO_NET_F_MTU;
    pub const MAC: u64 = 1 << VIRTIO_NET_F_MAC;
    pub const GUEST_TSO4: u64 = 1 << VIRTIO_NET_F_GUEST_TSO4;
    pub const GUEST_TSO6: u64 = 1 << VIRTIO_NET_F_GUEST_TSO6;
    pub const GUEST_ECN: u64 = 1 << VIRTIO_NET_F_GUEST_ECN;
    pub const GUEST_UFO: u64 = 1 << VIRTIO_NET_F_GUEST_UFO;
    pub const HOST_TSO4: u64 = 1 << VIRTIO_NET_F_HOST_TSO4;
    pub const HOST_TSO6: u64 = 1 << VIRTIO_NET_F_HOST_TSO6;
    pub const HOST_ECN: u64 = 1 << VIRTIO_NET_F_HOST_ECN;
    pub const HOST_UFO: u64 = 1 << VIRTIO_NET_F_HOST_UFO;
    pub const MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
    pub const STATUS: u64 = 1 << VIRTIO_NET_F_STATUS;
    pub const CTRL_VQ: u64 = 1 << VIRTIO_NET_F_CTRL_VQ;
    pub const CTRL_RX: u64 = 1 << VIRTIO_NET_F_CTRL_RX;
    pub const MQ: u64 = 1 << VIRTIO_NET_F_MQ;
}

/// `status` bit: link up.
pub const S_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
/// Size of the configuration space we expose: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;
/// Largest queue size of a split virtqueue.
pub const QUEUE_SIZE_MAX: u16 = 32768;
/// Most queue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX is 0x8000; this is what a tap allows).
pub const PAIRS_MAX: u16 = 256;

/// A net device as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface, opened or created.
    pub tap: String,
    /// Guest MAC address (default: 52:54:00:12:34:5N for the N-th device).
    pub mac: Option<[u8; 6]>,
    /// Queue pairs (one tap file each).
    pub queues: u16,
    pub queue_size: u16,
    /// Reactor index per queue (rx0, tx0, rx1, …, ctrl), round-robin over this list.
    pub reactors: Option<Vec<usize>>,
    /// Busy-poll the avail rings this long after activity, µs (0: off).
    pub poll_us: u32,
    /// MTU advertised to the guest (VIRTIO_NET_F_MTU), if any.
    pub mtu: Option<u16>,
    /// Offer segmentation offloads to the guest (GUEST_TSO4/TSO6/ECN/UFO): GSO frames of up
    /// to 64 KiB reach it whole, at the price of RX reads sized for such frames.
    pub rx_gso: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            tap: String::new(),
            mac: None,
            queues: 1,
            queue_size: 256,
            reactors: None,
            poll_us: 0,
            mtu: None,
            rx_gso: true,
        }
    }
}

/// Errors in a net option string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    #[error(
        "Unknown net option `{0}` (expected tap, mac, queues, queue-size, reactors, poll-us, mtu)"
    )]
    UnknownKey(String),
    #[error("Invalid value `{value}` for net option `{key}`: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("Net option `{0}` given twice")]
    Duplicate(String),
    #[error("A net device needs `tap=`")]
    MissingTap,
}

fn bad(key: &str, value: &str, reason: &str) -> NetConfigError {
    NetConfigError::BadValue {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Parses `52:54:00:12:34:56`; rejects multicast addresses, which a NIC cannot own.
pub fn parse_mac(value: &str) -> Result<[u8; 6], NetConfigError> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in value.split(':') {
        let b = mac.get_mut(n).ok_or_else(|| {
            bad(
                "mac",
                value,
                "expected six hex bytes such as 52:54:00:12:34:56",
            )
        })?;
        if part.len() != 2 {
            return Err(bad(
                "mac",
                value,
                "expected six hex bytes such as 52:54:00:12:34:56",
            ));
        }
        *b = u8::from_str_radix(part, 16).map_err(|_| {
            bad(
                "mac",
                value,
                "expected six hex bytes such as 52:54:00:12:34:56",
            )
        })?;
        n += 1;
    }
    if n != 6 {
        return Err(bad(
            "mac",
            value,
            "expected six hex bytes such as 52:54:00:12:34:56",
        ));
    }
    if mac[0] & 1 != 0 {
        return Err(bad(
            "mac",
            value,
            "multicast address (lowest bit of the first byte set)",
        ));
    }
    Ok(mac)
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    /// Parses `tap=NAME[,mac=52:54:00:12:34:56][,queues=N][,queue-size=256][,reactors=I,J]`
    /// `[,poll-us=N][,mtu=N]`. A bare number after `reactors=` continues its list.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut c = NetConfig::default();
        let options = split_options(s, "reactors").map_err(NetConfigError::Duplicate)?;
        for (key, value) in &options {
            let (key, value) = (*key, value.as_str());
            match key {
                "tap" => {
                    if value.is_empty() || value.len() > 15 || value.contains(['/', ' ', '\0']) {
                        return Err(bad(
                            key,
                            value,
                            "expected an interface name of 1 to 15 characters",
                        ));
                    }
                    c.tap = value.into();
                }
                "mac" => c.mac = Some(parse_mac(value)?),
                "queues" => {
                    c.queues = value
                        .parse()
                        .map_err(|_| bad(key, value, "expected a number of queue pairs"))?;
                    if c.queues == 0 || c.queues > PAIRS_MAX {
                        return Err(bad(key, value, &format!("must be 1 to {PAIRS_MAX}")));
                    }
                }
                "queue-size" => {
                    c.queue_size = value
                        .parse()
                        .map_err(|_| bad(key, value, "expected a power of two"))?;
                    if !c.queue_size.is_power_of_two()
                        || c.queue_size < 2
                        || c.queue_size > QUEUE_SIZE_MAX
                    {
                        return Err(bad(
                            key,
                            value,
                            &format!("must be a power of two from 2 to {QUEUE_SIZE_MAX}"),
                        ));
                    }
                }
                "reactors" => {
                    let list = parse_index_list(value)
                        .ok_or_else(|| bad(key, value, "expected reactor indexes such as 0,1"))?;
                    c.reactors = Some(list);
                }
                "poll-us" => {
                    c.poll_us = value
                        .parse()
                        .map_err(|_| bad(key, value, "expected microseconds"))?
                }
                "mtu" => {
                    let m: u16 = value
                        .parse()
                        .map_err(|_| bad(key, value, "expected 68 to 65535"))?;
                    if m < 68 {
                        return Err(bad(key, value, "expected 68 to 65535"));
                    }
                    c.mtu = Some(m);
                }
                "rx-gso" => {
                    c.rx_gso = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(key, value, "expected on or off")),
                    }
                }
                _ => return Err(NetConfigError::UnknownKey(key.into())),
            }
        }
        if c.tap.is_empty() {
            return Err(NetConfigError::MissingTap);
        }
        Ok(c)
    }
}

/// The configuration space (virtio 1.2, 5.1.4): mac, status, max_virtqueue_pairs, mtu.
pub fn config_space(mac: [u8; 6], pairs: u16, mtu: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
    c[8..10].copy_from_slice(&pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_full_options_all_set() {
        let c: NetConfig = "tap=rv0,mac=52:54:00:aa:bb:cc,queues=2,queue-size=512,reactors=0,1,poll-us=50,mtu=9000".parse().unwrap();
        assert_eq!(c.tap, "rv0");
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(c.queues, 2);
        assert_eq!(c.queue_size, 512);
        assert_eq!(c.reactors, Some(vec![0, 1]));
        assert_eq!(c.poll_us, 50);
        assert_eq!(c.mtu, Some(9000));
        assert!(
            c.rx_gso,
            "segmentation offloads to the guest are on by default"
        );
        let off: NetConfig = "tap=rv0,rx-gso=off".parse().unwrap();
        assert!(!off.rx_gso);
    }

    #[test]
    fn test_parse_defaults_one_pair() {
        let c: NetConfig = "tap=t0".parse().unwrap();
        assert_eq!(
            (c.queues, c.queue_size, c.mac, c.reactors),
            (1, 256, None, None)
        );
    }

    #[test]
    fn test_parse_bad_input_names_key_and_value() {
        for (s, want) in [
            ("", "needs `tap=`"),
            ("queues=2", "needs `tap=`"),
            ("tap=t0,queues=0", "`0` for net option `queues`"),
            ("tap=t0,queue-size=100", "`100` for net option `queue-size`"),
            ("tap=t0,mac=52:54:00:12:34", "net option `mac`"),
            ("tap=t0,mac=01:54:00:12:34:56", "multicast"),
            ("tap=t0,mac=zz:54:00:12:34:56", "`zz:54:00:12:34:56`"),
            ("tap=t0,colour=blue", "Unknown net option `colour`"),
            ("tap=t0,tap=t1", "given twice"),
            ("tap=a-name-too-long-for-linux", "net option `tap`"),
            ("tap=t0,reactors=x", "net option `reactors`"),
            ("tap=t0,mtu=10", "net option `mtu`"),
            ("tap=t0,rx-gso=maybe", "`maybe` for net option `rx-gso`"),
        ] {
            let e = s.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn test_config_space_layout_little_endian() {
        let c = config_space([1, 2, 3, 4, 5, 6], 4, 1500);
        assert_eq!(&c[0..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), S_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
    }
}
