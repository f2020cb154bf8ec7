//! The root complex of bus 0: a host bridge at 00:00.0, configuration mechanism #1 on
//! ports 0xCF8/0xCFC, ECAM in MMIO, BAR allocation in the 32-bit window or (with
//! `--pci-bars high`) the 64-bit window above guest RAM, and BAR moves.

use std::sync::{Arc, Mutex, Weak};

use super::config::{PciConfig, PciIds};
use super::{BarMove, PciDevice, PciError};
use crate::vmm::bus::{Bus, BusDevice};
use crate::vmm::layout::{PCI_MMIO_SIZE, PCI_MMIO_START};

pub const CONFIG_IO_BASE: u64 = 0xcf8;
pub const CONFIG_IO_SIZE: u64 = 8;
const MAX_SLOTS: usize = 32;

type Dev = Arc<Mutex<dyn PciDevice>>;

struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.0.read(reg)
    }
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        self.0.write(reg, offset, data)
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
}

fn lock(d: &Dev) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bus 0 and the MMIO window its BARs live in.
pub struct PciRoot {
    slots: Vec<Dev>,
    /// Weak: the MMIO bus holds the root's ECAM window, and a strong reference back would
    /// keep the whole device set (disks, their image locks, guest memory) alive after the
    /// VM stops.
    mmio: Weak<Bus>,
    next_bar: u64,
    /// The 64-bit window's next free address and end, when device BARs go there.
    mmio64: Option<(u64, u64)>,
    address: Mutex<u32>,
    /// Where each device's BARs are mapped on the MMIO bus now: (device, BAR, address). A
    /// BAR the guest moved onto an occupied range is not mapped, and moving it again must
    /// not unmap whatever occupies its recorded address (the ECAM window, another BAR).
    mapped: Mutex<Vec<(usize, usize, u64)>>,
}

/// Identity of a device for [`PciRoot::mapped`].
fn dev_id(d: &Dev) -> usize {
    Arc::as_ptr(d).cast::<()>() as usize
}

/// One BAR's range on the MMIO bus.
struct BarRegion {
    dev: Dev,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).read_bar(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).write_bar(self.bar, offset, data);
    }
}

impl PciRoot {
    pub fn new(mmio: &Arc<Bus>) -> Self {
        let bridge = PciConfig::new(PciIds {
            vendor: 0x1b36, // Red Hat, Inc.
            device: 0x0008, // PCIe host bridge
            class: 0x06,
            subclass: 0x00,
            prog_if: 0,
            revision: 0,
            subsystem_vendor: 0x1b36,
            subsystem: 0,
        });
        PciRoot {
            slots: vec![Arc::new(Mutex::new(HostBridge(bridge)))],
            mmio: Arc::downgrade(mmio),
            next_bar: PCI_MMIO_START,
            mmio64: None,
            address: Mutex::new(0),
            mapped: Mutex::new(Vec::new()),
        }
    }

    /// Reserves a naturally aligned window of `size` bytes for a BAR.
    pub fn allocate_bar(&mut self, size: u64) -> Result<u64, PciError> {
        let addr = self.next_bar.next_multiple_of(size);
        if addr + size > PCI_MMIO_START + PCI_MMIO_SIZE {
            return Err(PciError::NoBarSpace { size });
        }
        self.next_bar = addr + size;
        Ok(addr)
    }

    /// Places device BARs in `[start, start + size)` as 64-bit BARs from now on.
    pub fn set_mmio64_window(&mut self, start: u64, size: u64) {
        self.mmio64 = Some((start, start + size));
    }

    /// Reserves a memory BAR of `size` bytes where devices' BARs go: in the 64-bit window
    /// when there is one, else the 32-bit one. Returns the address and whether the BAR
    /// must be declared 64-bit.
    pub fn allocate_mem_bar(&mut self, size: u64) -> Result<(u64, bool), PciError> {
        let Some((next, end)) = self.mmio64 else {
            return self.allocate_bar(size).map(|a| (a, false));
        };
        let addr = next.next_multiple_of(size);
        if addr.checked_add(size).is_none_or(|e| e > end) {
            return Err(PciError::NoBarSpace { size });
        }
        self.mmio64 = Some((addr + size, end));
        Ok((addr, true))
    }

    /// Plugs `dev` into the next free slot and maps its BARs; returns the slot number.
    pub fn add(&mut self, dev: Dev) -> Result<usize, PciError> {
        if self.slots.len() >= MAX_SLOTS {
            return Err(PciError::NoSlot);
        }
        let mmio = self.mmio.upgrade().ok_or(PciError::NoBus)?;
        for (bar, addr, size) in lock(&dev).bars() {
            mmio.insert(
                Arc::new(Mutex::new(BarRegion {
                    dev: dev.clone(),
                    bar,
                })),
                addr,
                size,
            )?;
            self.mapped_bars().push((dev_id(&dev), bar, addr));
        }
        self.slots.push(dev);
        Ok(self.slots.len() - 1)
    }

    fn device(&self, bus: u32, slot: u32, function: u32) -> Option<&Dev> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(slot as usize)
    }

    fn config_read(&self, bus: u32, slot: u32, function: u32, reg: usize) -> u32 {
        self.device(bus, slot, function)
            .map_or(0xffff_ffff, |d| lock(d).read_config(reg))
    }

    fn config_write(
        &self,
        bus: u32,
        slot: u32,
        function: u32,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        let Some(dev) = self.device(bus, slot, function) else {
            return;
        };
        let moved = lock(dev).write_config(reg, offset, data);
        if let Some(m) = moved {
            self.move_bar(dev, m);
        }
    }

    fn move_bar(&self, dev: &Dev, m: BarMove) {
        let Some(mmio) = self.mmio.upgrade() else {
            return;
        };
        let id = dev_id(dev);
        let mut mapped = self.mapped_bars();
        // Unmap the BAR only where it is really mapped.
        if let Some(i) = mapped.iter().position(|e| e.0 == id && e.1 == m.bar) {
            let _ = mmio.remove(mapped[i].2);
            mapped.swap_remove(i);
        }
        let region = Arc::new(Mutex::new(BarRegion {
            dev: dev.clone(),
            bar: m.bar,
        }));
        match mmio.insert(region, m.new, m.len) {
            Ok(()) => {
                mapped.push((id, m.bar, m.new));
                drop(mapped);
                lock(dev).bar_moved(m.bar, m.old, m.new)
            }
            Err(e) => log::warn!(
                "pci: guest moved BAR{} to {:#x}, which is unusable: {e}",
                m.bar,
                m.new
            ),
        }
    }

    fn mapped_bars(&self) -> std::sync::MutexGuard<'_, Vec<(usize, usize, u64)>> {
        self.mapped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn address_register(&self) -> std::sync::MutexGuard<'_, u32> {
        self.address.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Configuration mechanism #1 (ports 0xCF8 address, 0xCFC..0xCFF data).
pub struct PciConfigIo(pub Arc<Mutex<PciRoot>>);

/// ECAM: bus << 20 | device << 15 | function << 12 | register.
pub struct PciConfigMmio(pub Arc<Mutex<PciRoot>>);

fn root(r: &Arc<Mutex<PciRoot>>) -> std::sync::MutexGuard<'_, PciRoot> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn extract(v: u32, byte: u64, data: &mut [u8]) {
    let bytes = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(byte as usize + i).copied().unwrap_or(0xff);
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let r = root(&self.0);
        if offset < 4 {
            extract(*r.address_register(), offset, data);
            return;
        }
        let addr = *r.address_register();
        if addr & 0x8000_0000 == 0 {
            data.fill(0xff);
            return;
        }
        let (bus, slot, func, reg) = (
            (addr >> 16) & 0xff,
            (addr >> 11) & 0x1f,
            (addr >> 8) & 7,
            ((addr >> 2) & 0x3f) as usize,
        );
        extract(r.config_read(bus, slot, func, reg), offset - 4, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let r = root(&self.0);
        if offset == 0 && data.len() == 4 {
            *r.address_register() = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            return;
        }
        let addr = *r.address_register();
        if offset < 4 || addr & 0x8000_0000 == 0 || (offset - 4) as usize + data.len() > 4 {
            return;
        }
        let (bus, slot, func, reg) = (
            (addr >> 16) & 0xff,
            (addr >> 11) & 0x1f,
            (addr >> 8) & 7,
            ((addr >> 2) & 0x3f) as usize,
        );
        r.config_write(bus, slot, func, reg, offset - 4, data);
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, func) = (
            (offset >> 20) as u32,
            ((offset >> 15) & 0x1f) as u32,
            ((offset >> 12) & 7) as u32,
        );
        let reg = ((offset & 0xfff) >> 2) as usize;
        let v = root(&self.0).config_read(bus, slot, func, reg);
        extract(v, offset & 3, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if (offset & 3) as usize + data.len() > 4 {
            return;
        }
        let (bus, slot, func) = (
            (offset >> 20) as u32,
            ((offset >> 15) & 0x1f) as u32,
            ((offset >> 12) & 7) as u32,
        );
        let reg = ((offset & 0xfff) >> 2) as usize;
        root(&self.0).config_write(bus, slot, func, reg, offset & 3, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_read(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000u32 | slot << 11 | reg << 2).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn test_host_bridge_visible_and_empty_slot_reads_ones() {
        let root = Arc::new(Mutex::new(PciRoot::new(&Arc::new(Bus::new()))));
        let mut io = PciConfigIo(root.clone());
        assert_eq!(io_read(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(io_read(&mut io, 5, 0), 0xffff_ffff);
        let mut ecam = PciConfigMmio(root);
        let mut b = [0u8; 2];
        ecam.read(0, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1b36);
        ecam.read(1 << 20, &mut b);
        assert_eq!(b, [0xff, 0xff], "bus 1 does not exist");
    }

    #[test]
    fn test_root_and_mmio_bus_with_ecam_are_freed_together() {
        let bus = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(&bus)));
        bus.insert(
            Arc::new(Mutex::new(PciConfigMmio(root.clone()))),
            0xe000_0000,
            1 << 20,
        )
        .unwrap();
        let (weak_root, weak_bus) = (Arc::downgrade(&root), Arc::downgrade(&bus));
        drop(root);
        drop(bus);
        // A strong root → bus reference closed a cycle that kept every device alive.
        assert!(weak_bus.upgrade().is_none(), "the MMIO bus leaked");
        assert!(weak_root.upgrade().is_none(), "the PCI root leaked");
    }

    /// A BAR the guest moves onto the ECAM window is not mapped there; moving it away again
    /// must leave the ECAM window alone (found by the pci_config fuzz target).
    #[test]
    fn test_bar_moved_onto_ecam_and_away_keeps_ecam_mapped() {
        use crate::devices::pci::config::{PciConfig, PciIds};
        struct OneBar(PciConfig);
        impl PciDevice for OneBar {
            fn read_config(&mut self, reg: usize) -> u32 {
                self.0.read(reg)
            }
            fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
                self.0.write(reg, offset, data)
            }
            fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
                data.fill(0x5a);
            }
            fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
            fn bars(&self) -> Vec<(usize, u64, u64)> {
                self.0.bars()
            }
        }
        let bus = Arc::new(Bus::new());
        let mut root = PciRoot::new(&bus);
        let mut cfg = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        let bar = root.allocate_bar(0x8000).unwrap();
        cfg.add_mem_bar(0, bar, 0x8000, false);
        root.add(Arc::new(Mutex::new(OneBar(cfg)))).unwrap();
        let root = Arc::new(Mutex::new(root));
        let ecam = 0xe000_0000u64;
        bus.insert(Arc::new(Mutex::new(PciConfigMmio(root))), ecam, 1 << 20)
            .unwrap();
        let bar0 = ecam | 1 << 15 | 0x10;
        bus.write(bar0, &(ecam as u32).to_le_bytes());
        bus.write(bar0, &0xd000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        assert!(bus.read(bar0, &mut b), "the ECAM window is still mapped");
        assert_eq!(u32::from_le_bytes(b), 0xd000_0000);
        assert!(
            bus.read(0xd000_0000, &mut b),
            "the BAR is mapped at its new address"
        );
        assert_eq!(b, [0x5a; 4]);
        assert!(
            !bus.read(bar, &mut b),
            "nothing left at the BAR's first address"
        );
    }

    #[test]
    fn test_mem_bar_allocation_uses_the_64bit_window_when_set() {
        let mut root = PciRoot::new(&Arc::new(Bus::new()));
        assert_eq!(
            root.allocate_mem_bar(0x8000).unwrap(),
            (PCI_MMIO_START, false)
        );
        let base = 0x40_0000_0000;
        root.set_mmio64_window(base, 0x10000);
        assert_eq!(root.allocate_mem_bar(0x8000).unwrap(), (base, true));
        assert_eq!(
            root.allocate_mem_bar(0x4000).unwrap(),
            (base + 0x8000, true)
        );
        assert!(
            matches!(
                root.allocate_mem_bar(0x8000),
                Err(PciError::NoBarSpace { size: 0x8000 })
            ),
            "the window is full"
        );
    }

    /// A 64-bit BAR the guest moves high and back, one dword at a time, answers at each
    /// final address through ECAM and the MMIO bus, and nowhere else.
    #[test]
    fn test_bar64_moved_by_both_dwords_is_mapped_at_the_full_address() {
        use crate::devices::pci::config::{PciConfig, PciIds};
        struct OneBar(PciConfig, Vec<(u64, u64)>);
        impl PciDevice for OneBar {
            fn read_config(&mut self, reg: usize) -> u32 {
                self.0.read(reg)
            }
            fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
                self.0.write(reg, offset, data)
            }
            fn read_bar(&mut self, _: usize, offset: u64, data: &mut [u8]) {
                data.fill(offset as u8 | 0x40);
            }
            fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
            fn bar_moved(&mut self, _: usize, old: u64, new: u64) {
                self.1.push((old, new));
            }
            fn bars(&self) -> Vec<(usize, u64, u64)> {
                self.0.bars()
            }
        }
        let bus = Arc::new(Bus::new());
        let mut root = PciRoot::new(&bus);
        root.set_mmio64_window(1 << 32, 1 << 30);
        let mut cfg = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        let (first, is64) = root.allocate_mem_bar(0x8000).unwrap();
        cfg.add_mem_bar(0, first, 0x8000, is64);
        let dev = Arc::new(Mutex::new(OneBar(cfg, Vec::new())));
        root.add(dev.clone()).unwrap();
        let ecam = 0xe000_0000u64;
        bus.insert(
            Arc::new(Mutex::new(PciConfigMmio(Arc::new(Mutex::new(root))))),
            ecam,
            1 << 20,
        )
        .unwrap();
        let (lo, hi) = (ecam | 1 << 15 | 0x10, ecam | 1 << 15 | 0x14);
        let mut b = [0u8; 4];
        assert!(bus.read(first + 4, &mut b), "mapped where it was placed");
        // To 256 GiB: the low dword stays 0, the high one moves it.
        bus.write(lo, &0u32.to_le_bytes());
        bus.write(hi, &0x40u32.to_le_bytes());
        let high = 0x40_0000_0000u64;
        assert!(bus.read(high + 4, &mut b));
        assert_eq!(b, [0x44; 4], "offset 4 inside the BAR at 256 GiB");
        assert!(!bus.read(first, &mut b), "gone from the first address");
        // Back below 4 GiB, low dword first (through 0x40_c000_0000).
        bus.write(lo, &0xc000_0000u32.to_le_bytes());
        bus.write(hi, &0u32.to_le_bytes());
        assert!(bus.read(0xc000_0000, &mut b));
        assert!(!bus.read(high, &mut b) && !bus.read(0x40_c000_0000, &mut b));
        let moves = &dev.lock().unwrap().1;
        assert_eq!(
            moves,
            &vec![
                (first, high),
                (high, 0x40_c000_0000),
                (0x40_c000_0000, 0xc000_0000)
            ],
            "the device saw every move (its ioeventfds follow)"
        );
    }

    #[test]
    fn test_bar_allocation_aligned_and_bounded() {
        let mut root = PciRoot::new(&Arc::new(Bus::new()));
        let a = root.allocate_bar(0x1000).unwrap();
        let b = root.allocate_bar(0x8000).unwrap();
        assert_eq!(a, PCI_MMIO_START);
        assert_eq!(b % 0x8000, 0);
        assert!(root.allocate_bar(PCI_MMIO_SIZE).is_err());
    }
}
