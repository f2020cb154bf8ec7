//! virtio-pci modern transport: capability parsing, common configuration,
//! status/feature negotiation, queue programming and notify addresses.

use super::status;
use crate::arch::mmio;
use crate::pci::{self, Bar, Function};

/// PCI vendor id of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;

/// The first function on bus 0 that is a virtio device with the given modern (0x1040 + type)
/// or transitional device id.
pub fn find_device(modern: u16, transitional: u16) -> Option<Function> {
    pci::bus0_functions().find(|f| {
        let (v, d) = f.vendor_device();
        v == VIRTIO_VENDOR && (d == modern || d == transitional)
    })
}

/// Vendor-specific capability id used by virtio.
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

// Common configuration offsets.
const DEVICE_FEATURE_SELECT: u64 = 0;
const DEVICE_FEATURE: u64 = 4;
const DRIVER_FEATURE_SELECT: u64 = 8;
const DRIVER_FEATURE: u64 = 12;
const CONFIG_MSIX_VECTOR: u64 = 16;
const NUM_QUEUES: u64 = 18;
const DEVICE_STATUS: u64 = 20;
const CONFIG_GENERATION: u64 = 21;
const QUEUE_SELECT: u64 = 22;
const QUEUE_SIZE: u64 = 24;
const QUEUE_MSIX_VECTOR: u64 = 26;
const QUEUE_ENABLE: u64 = 28;
const QUEUE_NOTIFY_OFF: u64 = 30;
const QUEUE_DESC: u64 = 32;
const QUEUE_DRIVER: u64 = 40;
const QUEUE_DEVICE: u64 = 48;

/// MSI-X "no vector": the device must not interrupt (polling, or no config interrupt).
pub const NO_VECTOR: u16 = 0xffff;

/// Status reads (each a VM exit, ~29 µs) before a reset is declared stuck: ~3 s.
const RESET_TIMEOUT_SPINS: u32 = 100_000;

/// Why a device could not be driven.
#[derive(Clone, Copy, Debug)]
pub enum TransportError {
    /// No common/notify/device capability (a legacy-only device).
    NoModernCaps,
    /// A BAR is unassigned and there is no room for it below 4 GiB.
    NoBarSpace,
    /// A BAR above 4 GiB cannot be mapped (beyond the physical address width, or out
    /// of page tables).
    BarUnmappable { addr: u64, error: crate::mem::MapError },
    /// The device did not finish a reset.
    ResetTimeout,
    /// The device refused the feature set (FEATURES_OK did not stick).
    FeaturesRefused,
    /// A queue the driver wanted does not exist (size 0).
    NoQueue(u16),
    /// The device did not accept an MSI-X vector for this queue (reads back NO_VECTOR).
    VectorRefused(u16),
}

/// A modern virtio-pci function with its configuration structures mapped.
pub struct VirtioPci {
    pub func: Function,
    /// Address of the common configuration (tells where the BAR ended up).
    pub common: u64,
    /// The driver moved a BAR (an unassigned one below 4 GiB, or with `bar64=` high).
    pub relocated: bool,
    notify_base: u64,
    notify_mult: u32,
    pub isr: u64,
    pub device_cfg: u64,
}

struct CapRef {
    bar: u8,
    offset: u32,
}

impl VirtioPci {
    /// Parses the virtio capabilities, gives unassigned BARs a place below 4 GiB,
    /// maps BARs above 4 GiB wherever the VMM put them, and enables memory decoding
    /// and bus mastering. `reserved` lists address ranges a moved BAR must avoid
    /// (the VM's memory map).
    pub fn new(func: Function, reserved: &[(u64, u64)]) -> Result<Self, TransportError> {
        Self::new_at(func, reserved, None)
    }

    /// As [`VirtioPci::new`], and with `bar64_at` moves the device's 64-bit BARs to that
    /// address and up first (blkbench `bar64=`: tests a VMM's 64-bit BAR relocation).
    pub fn new_at(func: Function, reserved: &[(u64, u64)], bar64_at: Option<u64>) -> Result<Self, TransportError> {
        let mut common = None;
        let mut notify = None;
        let mut isr = None;
        let mut device = None;
        let mut notify_mult = 0;
        for (off, id) in func.capabilities() {
            if id != CAP_VENDOR {
                continue;
            }
            let cfg_type = func.read8(off + 3);
            let r = CapRef { bar: func.read8(off + 4), offset: func.read32(off + 8) };
            if r.bar > 5 {
                continue;
            }
            // The first capability of each type is the preferred one.
            match cfg_type {
                CFG_COMMON if common.is_none() => common = Some(r),
                CFG_NOTIFY if notify.is_none() => {
                    notify_mult = func.read32(off + 16);
                    notify = Some(r);
                }
                CFG_ISR if isr.is_none() => isr = Some(r),
                CFG_DEVICE if device.is_none() => device = Some(r),
                _ => {}
            }
        }
        let (Some(common), Some(notify), Some(device)) = (common, notify, device) else {
            return Err(TransportError::NoModernCaps);
        };
        let isr = isr.unwrap_or(CapRef { bar: common.bar, offset: common.offset });

        // Size every BAR a capability uses; place the unassigned ones.
        let cmd = func.read16(pci::COMMAND);
        func.write16(pci::COMMAND, cmd & !(pci::COMMAND_MEMORY | pci::COMMAND_IO));
        let mut bars: [Bar; 6] = [Bar { index: 0, addr: 0, size: 0, is64: false }; 6];
        let mut nbars = 0;
        for r in [&common, &notify, &isr, &device] {
            if bars[..nbars].iter().any(|b| b.index == r.bar) {
                continue;
            }
            if let Some(b) = func.memory_bar(r.bar) {
                bars[nbars] = b;
                nbars += 1;
            }
        }
        func.write16(pci::COMMAND, cmd);
        let unassigned = bars[..nbars].iter().any(|b| b.addr == 0);
        if unassigned && !pci::place_bars_below_4g(func, &mut bars[..nbars], reserved) {
            return Err(TransportError::NoBarSpace);
        }
        let mut relocated = unassigned;
        if let Some(at) = bar64_at {
            relocated |= pci::place_bars_at(func, &mut bars[..nbars], at);
        }
        for b in &bars[..nbars] {
            // Saturating: a hostile VMM's BAR near 2^64 is refused by map_mmio, not wrapped.
            if b.addr.saturating_add(b.size) > 1 << 32 {
                crate::mem::map_mmio(b.addr, b.size)
                    .map_err(|error| TransportError::BarUnmappable { addr: b.addr, error })?;
            }
        }
        let base = |r: &CapRef| -> u64 {
            bars[..nbars].iter().find(|b| b.index == r.bar).map_or(0, |b| b.addr) + u64::from(r.offset)
        };
        let cmd = func.read16(pci::COMMAND);
        func.write16(pci::COMMAND, cmd | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER);
        Ok(VirtioPci {
            func,
            relocated,
            common: base(&common),
            notify_base: base(&notify),
            notify_mult,
            isr: base(&isr),
            device_cfg: base(&device),
        })
    }

    pub fn status(&self) -> u8 {
        mmio::read8(self.common + DEVICE_STATUS)
    }

    pub fn set_status(&self, s: u8) {
        mmio::write8(self.common + DEVICE_STATUS, s);
    }

    pub fn add_status(&self, s: u8) {
        self.set_status(self.status() | s);
    }

    /// Writes 0 to the status and waits for the device to read back 0.
    pub fn reset(&self) -> Result<(), TransportError> {
        self.set_status(0);
        for _ in 0..RESET_TIMEOUT_SPINS {
            if self.status() == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(TransportError::ResetTimeout)
    }

    pub fn device_features(&self) -> u64 {
        mmio::write32(self.common + DEVICE_FEATURE_SELECT, 0);
        let lo = mmio::read32(self.common + DEVICE_FEATURE);
        mmio::write32(self.common + DEVICE_FEATURE_SELECT, 1);
        let hi = mmio::read32(self.common + DEVICE_FEATURE);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Writes the driver features, sets FEATURES_OK and checks it stuck.
    pub fn negotiate(&self, features: u64) -> Result<(), TransportError> {
        mmio::write32(self.common + DRIVER_FEATURE_SELECT, 0);
        mmio::write32(self.common + DRIVER_FEATURE, features as u32);
        mmio::write32(self.common + DRIVER_FEATURE_SELECT, 1);
        mmio::write32(self.common + DRIVER_FEATURE, (features >> 32) as u32);
        self.add_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.add_status(status::FAILED);
            return Err(TransportError::FeaturesRefused);
        }
        mmio::write16(self.common + CONFIG_MSIX_VECTOR, NO_VECTOR);
        Ok(())
    }

    pub fn num_queues(&self) -> u16 {
        mmio::read16(self.common + NUM_QUEUES)
    }

    /// Maximum size of queue `q` (0: no such queue).
    pub fn queue_max_size(&self, q: u16) -> u16 {
        mmio::write16(self.common + QUEUE_SELECT, q);
        mmio::read16(self.common + QUEUE_SIZE)
    }

    /// Programs and enables queue `q` without an interrupt (we poll); returns its notify
    /// address.
    pub fn setup_queue(&self, q: u16, size: u16, desc: u64, driver: u64, device: u64) -> Result<u64, TransportError> {
        self.setup_queue_vector(q, size, [desc, driver, device], NO_VECTOR)
    }

    /// Programs and enables queue `q` (rings at `[desc, driver, device]`) with MSI-X vector
    /// `vector` (an entry of the function's MSI-X table, or NO_VECTOR); returns its notify
    /// address. A vector the device cannot use reads back as NO_VECTOR: an error.
    pub fn setup_queue_vector(&self, q: u16, size: u16, rings: [u64; 3], vector: u16) -> Result<u64, TransportError> {
        let [desc, driver, device] = rings;
        mmio::write16(self.common + QUEUE_SELECT, q);
        if mmio::read16(self.common + QUEUE_SIZE) == 0 {
            return Err(TransportError::NoQueue(q));
        }
        mmio::write16(self.common + QUEUE_SIZE, size);
        mmio::write16(self.common + QUEUE_MSIX_VECTOR, vector);
        if vector != NO_VECTOR && mmio::read16(self.common + QUEUE_MSIX_VECTOR) != vector {
            return Err(TransportError::VectorRefused(q));
        }
        mmio::write64_split(self.common + QUEUE_DESC, desc);
        mmio::write64_split(self.common + QUEUE_DRIVER, driver);
        mmio::write64_split(self.common + QUEUE_DEVICE, device);
        let off = mmio::read16(self.common + QUEUE_NOTIFY_OFF);
        mmio::write16(self.common + QUEUE_ENABLE, 1);
        Ok(self.notify_base + u64::from(off) * u64::from(self.notify_mult))
    }

    /// Reads device configuration consistently (retries across generation changes).
    pub fn read_device_config<T>(&self, read: impl Fn(u64) -> T) -> T {
        loop {
            let gen = mmio::read8(self.common + CONFIG_GENERATION);
            let v = read(self.device_cfg);
            if mmio::read8(self.common + CONFIG_GENERATION) == gen {
                return v;
            }
        }
    }
}
