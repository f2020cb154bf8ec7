//! virtio-blk: feature bits, configuration space, request types.

use super::pci::VirtioPci;
use crate::arch::mmio;

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Features this driver implements and accepts when offered.
/// (SIZE_MAX is left out: we never split a buffer, so we cannot honour it.)
pub const DRIVER_FEATURES: u64 = super::F_VERSION_1
    | super::F_EVENT_IDX
    | super::F_INDIRECT_DESC
    | F_SEG_MAX
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_MQ
    | F_DISCARD
    | F_WRITE_ZEROES;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Size of `virtio_blk_outhdr`.
pub const HEADER_SIZE: u32 = 16;
/// The unit of `sector` fields, whatever the device's block size.
pub const SECTOR_SIZE: u64 = 512;

/// The parts of `virtio_blk_config` the benchmark uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
}

impl BlkConfig {
    /// Reads the configuration valid under the negotiated `features`.
    pub fn read(dev: &VirtioPci, features: u64) -> Self {
        dev.read_device_config(|cfg| BlkConfig {
            capacity_sectors: u64::from(mmio::read32(cfg)) | (u64::from(mmio::read32(cfg + 4)) << 32),
            seg_max: if features & F_SEG_MAX != 0 { mmio::read32(cfg + 12) } else { 0 },
            blk_size: if features & F_BLK_SIZE != 0 { mmio::read32(cfg + 20) } else { 512 },
            num_queues: if features & F_MQ != 0 { mmio::read16(cfg + 34).max(1) } else { 1 },
        })
    }
}

/// Writes a request header at `at`.
#[inline(always)]
pub fn write_header(at: u64, kind: u32, sector: u64) {
    mmio::write32(at, kind);
    mmio::write32(at + 4, 0);
    // SAFETY: the header lives in driver-owned RAM, 8-byte aligned.
    unsafe { core::ptr::write_volatile((at + 8) as *mut u64, sector) };
}
