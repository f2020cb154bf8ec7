//! The virtio-pci modern transport (virtio 1.2, 4.1; no legacy interface).
//!
//! BAR 0 (memory, 32 KiB; 32-bit, or 64-bit above guest RAM with `--pci-bars high`) holds
//! every structure the driver touches:
//!
//! | offset | structure |
//! |--------|-----------|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notify: queue `q` at `q * 4`, each caught by its own KVM ioeventfd |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X PBA |
//!
//! A kick therefore never leaves the kernel: KVM signals the queue's eventfd and the
//! reactor serving the queue wakes. Interrupts go the other way through one irqfd per
//! MSI-X vector, registered only while the vector is enabled and unmasked.
//!
//! This file is the PCI function (configuration space, BAR dispatch, notify ioeventfds,
//! MSI-X routing); `common.rs` is the common configuration structure and the device
//! status state machine it drives.

use virtio_bindings::virtio_config;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod common;

use super::{GuestMemory, VirtioDevice};
use crate::devices::pci::config::{PciConfig, PciIds};
use crate::devices::pci::msix::MsixTable;
use crate::devices::pci::{BarMove, PciDevice, PciError, PciRoot};
use crate::vmm::irq::{IrqError, VmInterrupts};

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const MAX_QUEUES: usize = 256;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

pub const NO_VECTOR: u16 = 0xffff;

const STATUS_DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_FEATURES_OK: u8 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_NEEDS_RESET: u8 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const STATUS_FAILED: u8 = virtio_config::VIRTIO_CONFIG_S_FAILED as u8;

/// Guest mistakes logged per device before going quiet.
const MAX_WARNINGS: u32 = 16;

/// Errors from creating a virtio-pci function.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("Device has {0} queues; at most {MAX_QUEUES} are supported")]
    TooManyQueues(usize),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Irq(#[from] IrqError),
    #[error("Failed to register a queue notify ioeventfd")]
    Ioeventfd(#[source] kvm_ioctls::Error),
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

struct Vector {
    gsi: u32,
    fd: EventFd,
    registered: bool,
}

/// One virtio device behind a modern virtio-pci function.
pub struct VirtioPci {
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    msix: MsixTable,
    vectors: Vec<Vector>,
    irq: Box<dyn VmInterrupts>,
    mem: GuestMemory,
    bar: u64,
    kicks: Vec<EventFd>,
    queues: Vec<QueueRegs>,
    max_size: u16,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    config_vector: u16,
    config_generation: u8,
    active: bool,
    warnings: u32,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![CAP_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

impl VirtioPci {
    /// Wraps `device` in a virtio-pci function with its BAR allocated from `root`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        root: &mut PciRoot,
        irq: impl VmInterrupts + 'static,
        mem: GuestMemory,
    ) -> Result<Self, VirtioPciError> {
        let nq = device.num_queues();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(nq));
        }
        let (bar, bar64) = root.allocate_mem_bar(BAR_SIZE)?;
        let ty = device.device_type();
        let (class, subclass) = match ty {
            super::TYPE_BLOCK => (0x01, 0x00),
            super::TYPE_NET => (0x02, 0x00),
            _ => (0xff, 0x00),
        };
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + ty as u16,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_mem_bar(0, bar, BAR_SIZE, bar64);
        config.add_capability(&vendor_cap(CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, None));
        config.add_capability(&vendor_cap(
            CFG_NOTIFY,
            NOTIFY_OFFSET,
            nq as u64 * NOTIFY_MULTIPLIER as u64,
            Some(NOTIFY_MULTIPLIER),
        ));
        config.add_capability(&vendor_cap(CFG_ISR, ISR_OFFSET, 1, None));
        config.add_capability(&vendor_cap(
            CFG_DEVICE,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_SIZE,
            None,
        ));
        let msix = MsixTable::new(nq as u16 + 1);
        let msix_cap = config.add_capability(&msix.capability(
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        ));
        // Message control (upper half of the capability's first dword) is guest-writable.
        config.set_writable(msix_cap / 4, 0xc000_0000);

        let mut vectors = Vec::with_capacity(nq + 1);
        for _ in 0..=nq {
            vectors.push(Vector {
                gsi: irq.allocate_gsi()?,
                fd: EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?,
                registered: false,
            });
        }
        let mut kicks = Vec::with_capacity(nq);
        for q in 0..nq {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?;
            irq.register_ioevent(
                &fd,
                bar + NOTIFY_OFFSET + q as u64 * NOTIFY_MULTIPLIER as u64,
            )
            .map_err(VirtioPciError::Ioeventfd)?;
            kicks.push(fd);
        }
        let max_size = device.queue_max_size();
        let regs = QueueRegs {
            size: max_size,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        };
        Ok(VirtioPci {
            config,
            device,
            msix,
            vectors,
            irq: Box::new(irq),
            mem,
            bar,
            kicks,
            queues: vec![regs; nq],
            max_size,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            config_generation: 0,
            active: false,
            warnings: 0,
        })
    }

    fn warn(&mut self, msg: std::fmt::Arguments) {
        self.warnings += 1;
        if self.warnings <= MAX_WARNINGS {
            log::warn!(
                "virtio-pci: {msg}{}",
                if self.warnings == MAX_WARNINGS {
                    " (further warnings suppressed)"
                } else {
                    ""
                }
            );
        }
    }

    /// Brings KVM's routes and irqfds in line with the MSI-X table.
    fn sync_vectors(&mut self) {
        for v in 0..self.vectors.len() {
            let msg = self.msix.active(v as u16);
            let (gsi, registered) = (self.vectors[v].gsi, self.vectors[v].registered);
            if let Err(e) = self.irq.set_msi(gsi, msg) {
                log::error!("virtio-pci: MSI route for vector {v}: {e}");
                continue;
            }
            let vm = &self.irq;
            match (msg.is_some(), registered) {
                (true, false) => match vm.register_irqfd(&self.vectors[v].fd, gsi) {
                    Ok(()) => self.vectors[v].registered = true,
                    Err(e) => log::error!("virtio-pci: irqfd for vector {v}: {e}"),
                },
                (false, true) => {
                    // Unregistered, the eventfd keeps counting: KVM delivers the pending
                    // interrupt when the vector is registered again on unmask.
                    let _ = vm.unregister_irqfd(&self.vectors[v].fd, gsi);
                    self.vectors[v].registered = false;
                }
                _ => {}
            }
        }
    }
}

impl PciDevice for VirtioPci {
    fn read_config(&mut self, reg: usize) -> u32 {
        let v = self.config.read(reg);
        match self.msix_control_reg() {
            Some(r) if r == reg => (v & 0x0000_ffff) | (self.msix.control() as u32) << 16,
            _ => v,
        }
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(reg, offset, data);
        if self.msix_control_reg() == Some(reg) {
            let ctl = (self.config.read(reg) >> 16) as u16;
            self.msix.set_control(ctl);
            self.sync_vectors();
        }
        moved
    }

    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.read_common(o, data),
            ISR_OFFSET => data.fill(0),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Normally caught by the ioeventfd; a notify that exits anyway still kicks.
                let q = ((o - NOTIFY_OFFSET) / NOTIFY_MULTIPLIER as u64) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o)
                && self.msix.write_table(o - MSIX_TABLE_OFFSET, data).is_some() =>
            {
                self.sync_vectors();
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, _bar: usize, _old: u64, new: u64) {
        // The ioeventfds sit where the BAR was last mapped, which is not `old` when the
        // guest moved it through an address that could not be mapped.
        let old = self.bar;
        for (q, fd) in self.kicks.iter().enumerate() {
            let off = NOTIFY_OFFSET + q as u64 * NOTIFY_MULTIPLIER as u64;
            let _ = self.irq.unregister_ioevent(fd, old + off);
            if let Err(e) = self.irq.register_ioevent(fd, new + off) {
                log::error!(
                    "virtio-pci: notify ioeventfd for queue {q} at {:#x}: {e}",
                    new + off
                );
            }
        }
        self.bar = new;
    }

    fn bars(&self) -> Vec<(usize, u64, u64)> {
        self.config.bars()
    }
}

impl VirtioPci {
    fn msix_control_reg(&self) -> Option<usize> {
        // The MSI-X capability is the last one added; find it by walking the list.
        let mut ptr = (self.config.read(13) & 0xff) as usize;
        let mut hops = 0;
        while ptr != 0 && hops < 48 {
            if self.config.read_bytes(ptr, 1) == crate::devices::pci::msix::MSIX_CAP_ID as u32 {
                return Some(ptr / 4);
            }
            ptr = self.config.read_bytes(ptr + 1, 1) as usize;
            hops += 1;
        }
        None
    }

    /// Guest address of BAR 0.
    pub fn bar_address(&self) -> u64 {
        self.bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, ActiveQueue, F_VERSION_1};
    use crate::vmm::bus::Bus;
    use crate::vmm::irq::IrqRouter;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Log {
        activated: Vec<(u64, Vec<(u16, bool)>)>,
        resets: usize,
    }

    struct FakeDevice(Arc<Mutex<Log>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            super::super::TYPE_BLOCK
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | super::super::F_RING_EVENT_IDX
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemory,
            features: u64,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activated.push((
                features,
                queues.iter().map(|q| (q.index, q.irq.is_some())).collect(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    /// A transport on a real KVM VM (ioeventfds and irqfds need one).
    fn transport() -> Option<(VirtioPci, Arc<Mutex<Log>>)> {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("skipping: this test needs /dev/kvm ({e})");
                return None;
            }
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let irq = IrqRouter::new(vm);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let bus = Arc::new(Bus::new());
        let mut root = PciRoot::new(&bus);
        let log = Arc::new(Mutex::new(Log::default()));
        let t = VirtioPci::new(Box::new(FakeDevice(log.clone())), &mut root, irq, mem).unwrap();
        Some((t, log))
    }

    fn w(t: &mut VirtioPci, off: u64, v: u64, len: usize) {
        t.write_bar(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(t: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn setup_queue(t: &mut VirtioPci, q: u64, base: u64, vector: u16) {
        w(t, 0x16, q, 2);
        w(t, 0x18, 64, 2);
        w(t, 0x1a, vector as u64, 2);
        w(t, 0x20, base, 8);
        w(t, 0x28, base + 0x1000, 4);
        w(t, 0x2c, 0, 4);
        w(t, 0x30, base + 0x2000, 8);
        w(t, 0x1c, 1, 2);
    }

    #[test]
    fn test_transport_init_sequence_activates_enabled_queues() {
        let Some((mut t, log)) = transport() else {
            return;
        };
        assert_eq!(r(&mut t, 0x12, 2), 2, "num_queues");
        w(&mut t, 0x14, 1 | 2, 1);
        w(&mut t, 0x00, 1, 4);
        assert_eq!(r(&mut t, 0x04, 4), 1, "VERSION_1 in the high word");
        w(&mut t, 0x08, 0, 4);
        w(&mut t, 0x0c, 1 << 29, 4);
        w(&mut t, 0x08, 1, 4);
        w(&mut t, 0x0c, 1, 4);
        w(&mut t, 0x14, 1 | 2 | 8, 1);
        assert_eq!(r(&mut t, 0x14, 1), 11, "FEATURES_OK accepted");
        setup_queue(&mut t, 0, 0x10_0000, 1);
        setup_queue(&mut t, 1, 0x20_0000, NO_VECTOR);
        w(&mut t, 0x16, 0, 2);
        assert_eq!(r(&mut t, 0x18, 2), 64);
        assert_eq!(r(&mut t, 0x20, 8), 0x10_0000);
        w(&mut t, 0x14, 1 | 2 | 8 | 4, 1);
        let l = log.lock().unwrap();
        assert_eq!(
            l.activated,
            vec![(F_VERSION_1 | (1 << 29), vec![(0, true), (1, false)])]
        );
    }

    #[test]
    fn test_transport_unoffered_feature_refuses_features_ok() {
        let Some((mut t, _)) = transport() else {
            return;
        };
        w(&mut t, 0x08, 0, 4);
        w(&mut t, 0x0c, 1 << 5, 4);
        w(&mut t, 0x14, 1 | 2 | 8, 1);
        assert_eq!(r(&mut t, 0x14, 1) & 8, 0);
    }

    #[test]
    fn test_transport_bad_queue_size_and_vector_ignored() {
        let Some((mut t, _)) = transport() else {
            return;
        };
        w(&mut t, 0x16, 0, 2);
        w(&mut t, 0x18, 100, 2);
        assert_eq!(r(&mut t, 0x18, 2), 256, "non power of two ignored");
        w(&mut t, 0x18, 512, 2);
        assert_eq!(r(&mut t, 0x18, 2), 256, "above max ignored");
        w(&mut t, 0x1a, 77, 2);
        assert_eq!(
            r(&mut t, 0x1a, 2),
            NO_VECTOR as u64,
            "unknown vector reads back NO_VECTOR"
        );
        w(&mut t, 0x16, 9, 2);
        assert_eq!(r(&mut t, 0x18, 2), 0, "queue beyond num_queues has size 0");
        w(&mut t, 0x3f, 0xff, 1);
    }

    #[test]
    fn test_transport_rings_outside_memory_need_reset() {
        let Some((mut t, log)) = transport() else {
            return;
        };
        w(&mut t, 0x08, 1, 4);
        w(&mut t, 0x0c, 1, 4);
        w(&mut t, 0x14, 1 | 2 | 8, 1);
        setup_queue(&mut t, 0, 0x7fff_0000_0000, NO_VECTOR);
        w(&mut t, 0x14, 1 | 2 | 8 | 4, 1);
        assert_ne!(r(&mut t, 0x14, 1) & STATUS_NEEDS_RESET as u64, 0);
        assert!(log.lock().unwrap().activated.is_empty());
        w(&mut t, 0x14, 0, 1);
        assert_eq!(r(&mut t, 0x14, 1), 0, "reset clears status");
    }

    #[test]
    fn test_transport_reset_after_activation_resets_device() {
        let Some((mut t, log)) = transport() else {
            return;
        };
        w(&mut t, 0x08, 1, 4);
        w(&mut t, 0x0c, 1, 4);
        w(&mut t, 0x14, 1 | 2 | 8, 1);
        setup_queue(&mut t, 0, 0x10_0000, 0);
        w(&mut t, 0x14, 15, 1);
        w(&mut t, 0x14, 0, 1);
        assert_eq!(log.lock().unwrap().resets, 1);
        w(&mut t, 0x16, 0, 2);
        assert_eq!(r(&mut t, 0x1c, 2), 0, "queue disabled after reset");
    }

    #[test]
    fn test_transport_msix_unmask_registers_irqfd() {
        let Some((mut t, _)) = transport() else {
            return;
        };
        let cap = t.msix_control_reg().unwrap();
        t.write_bar(0, MSIX_TABLE_OFFSET, &0xfee0_0000u32.to_le_bytes());
        t.write_bar(0, MSIX_TABLE_OFFSET + 8, &0x30u32.to_le_bytes());
        t.write_bar(0, MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
        assert!(!t.vectors[0].registered, "MSI-X still disabled");
        t.write_config(cap, 2, &0x8000u16.to_le_bytes());
        assert!(t.vectors[0].registered);
        assert!(!t.vectors[1].registered, "vector 1 still masked");
        t.write_bar(0, MSIX_TABLE_OFFSET + 12, &1u32.to_le_bytes());
        assert!(!t.vectors[0].registered, "masking unregisters");
    }
}
