//! virtio-net: feature bits, configuration space, the per-packet header.

use super::pci::VirtioPci;
use crate::arch::mmio;
use crate::netproto::Mac;

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;

/// Features this driver implements and accepts when offered. No offloads
/// (CSUM, GUEST_CSUM, TSO/UFO): the guest computes every checksum, so the
/// device sees and delivers complete frames. No control queue, one pair.
pub const DRIVER_FEATURES: u64 =
    super::F_VERSION_1 | super::F_EVENT_IDX | F_MTU | F_MAC | F_MRG_RXBUF | F_STATUS;

/// `virtio_net_hdr_v1`: with VERSION_1 the header always has `num_buffers`.
pub const HDR_SIZE: usize = 12;
/// Offset of `num_buffers` (u16) in the header.
pub const HDR_NUM_BUFFERS: usize = 10;

/// `status` bit: link up.
pub const S_LINK_UP: u16 = 1;

/// Receive queue of pair 0 and transmit queue of pair 0.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

/// The parts of `virtio_net_config` the driver uses (each field only when its
/// feature was negotiated).
#[derive(Clone, Copy, Debug, Default)]
pub struct NetConfig {
    pub mac: Option<Mac>,
    pub status: Option<u16>,
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// Reads the configuration valid under the negotiated `features`
    /// (each byte is a VM exit: done once at start-up).
    pub fn read(dev: &VirtioPci, features: u64) -> Self {
        dev.read_device_config(|cfg| NetConfig {
            mac: (features & F_MAC != 0).then(|| core::array::from_fn(|i| mmio::read8(cfg + i as u64))),
            status: (features & F_STATUS != 0).then(|| mmio::read16(cfg + 6)),
            mtu: (features & F_MTU != 0).then(|| mmio::read16(cfg + 10)),
        })
    }

    /// Link state: up when STATUS was not negotiated (the spec's assumption).
    pub fn link_up(&self) -> bool {
        self.status.is_none_or(|s| s & S_LINK_UP != 0)
    }
}
