//! The PCI harness of `fuzz/fuzz_targets/pci_config.rs` and its corpus replay test.
//!
//! A bus-0 root complex with the host bridge and one virtio-pci function (a fake two-queue
//! device behind the real transport, and a recording fake of KVM's interrupt plumbing), the
//! ECAM window and the BAR on one MMIO bus, configuration mechanism #1 beside it. The input
//! is a list of guest accesses, each a kind byte then its operands (missing bytes read as
//! zero):
//!
//! | kind % 8 | access |
//! |---|---|
//! | 0 | `u32` to 0xCF8 (the address register) |
//! | 1 | write of 1, 2 or 4 bytes to 0xCFC + `off % 4` |
//! | 2 | read of 1, 2 or 4 bytes from 0xCFC + `off % 4` |
//! | 3 | ECAM write: slot `% 4`, byte offset in the 4 KiB space, 1, 2 or 4 bytes |
//! | 4 | ECAM read, same operands |
//! | 5 | MMIO write of 1, 2, 4 or 8 bytes at `BAR0 + off % 0x8000` (where the BAR is now) |
//! | 6 | MMIO read, same operands |
//! | 7 | BAR sizing of BAR `n % 6` of slot 1: all ones, read back, restore |
//!
//! After every access the harness checks what the guest can see against what KVM would
//! have been told: an irqfd and an MSI route exist exactly for the vectors that MSI-X
//! enables and nobody masks, no ioeventfd is registered twice, and BAR sizing reads back
//! the BAR's size.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::root::{PciConfigIo, PciConfigMmio};
use crate::devices::pci::{PciDevice, PciRoot};
use crate::devices::virtio::pci::{VirtioPci, BAR_SIZE};
use crate::devices::virtio::{
    ActivateError, ActiveQueue, GuestMemory, VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1,
    TYPE_BLOCK,
};
use crate::vmm::bus::{Bus, BusDevice};
use crate::vmm::irq::{IrqError, MsiMessage, VmInterrupts};
use crate::vmm::layout::{PCI_ECAM_BUS0_SIZE, PCI_ECAM_START};

/// Most accesses one input makes.
const MAX_OPS: usize = 512;
const QUEUES: usize = 2;
const MSIX_TABLE: u64 = 0x4000;

/// What the fake KVM was told.
#[derive(Debug, Default)]
struct KvmState {
    next_gsi: u32,
    routes: BTreeMap<u32, MsiMessage>,
    /// gsi → registered irqfds.
    irqfds: BTreeMap<u32, usize>,
    /// MMIO address → registered ioeventfds.
    ioevents: BTreeMap<u64, usize>,
}

/// A recording stand-in for [`crate::vmm::irq::IrqRouter`] that fails like KVM does.
#[derive(Clone, Default)]
struct FakeKvm(Arc<Mutex<KvmState>>);

impl FakeKvm {
    fn state(&self) -> MutexGuard<'_, KvmState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn errno(e: i32) -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(e)
}

impl VmInterrupts for FakeKvm {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut s = self.state();
        s.next_gsi += 1;
        Ok(s.next_gsi - 1)
    }
    fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        let mut s = self.state();
        match msg {
            Some(m) => s.routes.insert(gsi, m),
            None => s.routes.remove(&gsi),
        };
        Ok(())
    }
    fn register_irqfd(&self, _: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.state();
        let n = s.irqfds.entry(gsi).or_default();
        if *n > 0 {
            return Err(errno(libc::EBUSY));
        }
        *n += 1;
        Ok(())
    }
    fn unregister_irqfd(&self, _: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.state();
        match s.irqfds.get_mut(&gsi) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            _ => Err(errno(libc::ENOENT)),
        }
    }
    fn register_ioevent(&self, _: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.state();
        let n = s.ioevents.entry(addr).or_default();
        if *n > 0 {
            return Err(errno(libc::EEXIST));
        }
        *n += 1;
        Ok(())
    }
    fn unregister_ioevent(&self, _: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.state();
        match s.ioevents.get_mut(&addr) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            _ => Err(errno(libc::ENOENT)),
        }
    }
}

/// A two-queue device that accepts every activation.
struct FakeDevice {
    active: bool,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn num_queues(&self) -> usize {
        QUEUES
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: GuestMemory,
        _: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        assert!(!queues.is_empty() && queues.len() <= QUEUES);
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.active = false;
    }
}

/// One input's machine.
struct Rig {
    bus: Arc<Bus>,
    io: PciConfigIo,
    dev: Arc<Mutex<VirtioPci>>,
    kvm: FakeKvm,
}

impl Rig {
    fn new(mem: GuestMemory) -> Self {
        let bus = Arc::new(Bus::new());
        let mut root = PciRoot::new(&bus);
        let kvm = FakeKvm::default();
        let t = VirtioPci::new(
            Box::new(FakeDevice { active: false }),
            &mut root,
            kvm.clone(),
            mem,
        )
        .expect("a virtio-pci function on a fake VM");
        let dev = Arc::new(Mutex::new(t));
        root.add(dev.clone()).expect("slot 1");
        let root = Arc::new(Mutex::new(root));
        bus.insert(
            Arc::new(Mutex::new(PciConfigMmio(root.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_BUS0_SIZE,
        )
        .expect("ECAM window");
        Rig {
            bus,
            io: PciConfigIo(root),
            dev,
            kvm,
        }
    }

    fn dev(&self) -> MutexGuard<'_, VirtioPci> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ecam_addr(slot: u8, off: u16) -> u64 {
        PCI_ECAM_START | u64::from(slot % 4) << 15 | u64::from(off & 0xfff)
    }

    /// The guest's view: which vectors MSI-X delivers now.
    fn live_vectors(&self) -> Vec<bool> {
        let mut d = self.dev();
        // Walk the capability list for MSI-X (id 0x11), as a driver does.
        let mut ptr = (d.read_config(13) & 0xff) as usize;
        let mut control = 0u32;
        for _ in 0..48 {
            if ptr < 0x40 {
                break;
            }
            let head = d.read_config(ptr / 4) >> (8 * (ptr % 4));
            if head & 0xff == 0x11 {
                control = d.read_config(ptr / 4) >> 16;
                break;
            }
            ptr = (head >> 8 & 0xff) as usize;
        }
        let on = control & 0x8000 != 0 && control & 0x4000 == 0;
        (0..=QUEUES as u64)
            .map(|v| {
                let mut b = [0u8; 4];
                d.read_bar(0, MSIX_TABLE + 16 * v + 12, &mut b);
                on && u32::from_le_bytes(b) & 1 == 0
            })
            .collect()
    }

    fn check(&self) {
        let live = self.live_vectors();
        let s = self.kvm.state();
        for (v, &l) in live.iter().enumerate() {
            let gsi = v as u32;
            let fds = s.irqfds.get(&gsi).copied().unwrap_or(0);
            assert_eq!(
                fds,
                usize::from(l),
                "vector {v}: irqfd registered {fds}×, live {l}"
            );
            assert_eq!(
                s.routes.contains_key(&gsi),
                l,
                "vector {v}: MSI route present while live is {l}"
            );
        }
        assert!(s.ioevents.values().all(|&n| n <= 1));
    }
}

/// Little-endian operands from the input; zero once it runs out.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..n].iter_mut().for_each(|x| *x = self.u8());
        b
    }
}

fn width(sel: u8, max8: bool) -> usize {
    match sel % if max8 { 4 } else { 3 } {
        0 => 1,
        1 => 2,
        2 => 4,
        _ => 8,
    }
}

/// Runs one input. Panics on a broken invariant.
pub fn fuzz_one(data: &[u8]) {
    let mem = super::guest_memory();
    let mut rig = Rig::new(mem);
    let mut r = Reader(data);
    for _ in 0..MAX_OPS {
        if r.0.is_empty() {
            break;
        }
        let kind = r.u8();
        match kind % 8 {
            0 => {
                let v = r.bytes(4);
                rig.io.write(0, &v[..4]);
            }
            1 | 2 => {
                let sel = r.u8();
                let (off, n) = (4 + u64::from(sel & 3), width(sel >> 2, false));
                if kind % 8 == 1 {
                    let v = r.bytes(n);
                    rig.io.write(off, &v[..n]);
                } else {
                    let mut b = [0u8; 4];
                    rig.io.read(off, &mut b[..n]);
                }
            }
            3 | 4 => {
                let (slot, off, sel) = (r.u8(), r.u16(), r.u8());
                let (addr, n) = (Rig::ecam_addr(slot, off), width(sel, false));
                if kind % 8 == 3 {
                    let v = r.bytes(n);
                    rig.bus.write(addr, &v[..n]);
                } else {
                    let mut b = [0u8; 4];
                    rig.bus.read(addr, &mut b[..n]);
                }
            }
            5 | 6 => {
                let (off, sel) = (r.u16(), r.u8());
                let n = width(sel, true);
                let base = rig.dev().bar_address();
                let addr = base + u64::from(off) % BAR_SIZE;
                if kind % 8 == 5 {
                    let v = r.bytes(n);
                    rig.bus.write(addr, &v[..n]);
                } else {
                    let mut b = [0u8; 8];
                    rig.bus.read(addr, &mut b[..n]);
                }
            }
            _ => {
                let bar = u16::from(r.u8() % 6);
                let reg = 0x10 + 4 * bar;
                let addr = Rig::ecam_addr(1, reg);
                let mut old = [0u8; 4];
                rig.bus.read(addr, &mut old);
                rig.bus.write(addr, &[0xff; 4]);
                let mut size = [0u8; 4];
                rig.bus.read(addr, &mut size);
                let size = u32::from_le_bytes(size);
                let expect = rig
                    .dev()
                    .bars()
                    .iter()
                    .find(|b| b.0 == usize::from(bar))
                    .map(|b| !(b.2 as u32 - 1));
                if let Some(mask) = expect {
                    assert_eq!(size & !0xf, mask, "BAR{bar} sizing reads back its size");
                } else {
                    assert_eq!(size, 0, "unimplemented BAR{bar} reads back 0 after sizing");
                }
                rig.bus.write(addr, &old);
            }
        }
        rig.check();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_cf8(out: &mut Vec<u8>, slot: u32, reg: u32) {
        out.push(0);
        out.extend_from_slice(&(0x8000_0000u32 | slot << 11 | reg << 2).to_le_bytes());
    }

    /// Seed inputs: a driver's MSI-X set-up, BAR sizing of every BAR, a BAR move, and a
    /// virtio initialisation through the common configuration.
    pub(crate) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut msix = Vec::new();
        // Table entry 0: address, data, unmask (MMIO writes of 4 bytes).
        for (off, v) in [(0x4000u16, 0xfee0_0000u32), (0x4008, 0x41), (0x400c, 0)] {
            msix.push(5);
            msix.extend_from_slice(&off.to_le_bytes());
            msix.push(2);
            msix.extend_from_slice(&v.to_le_bytes());
        }
        // Message control (capability at 0x84, upper half): enable.
        msix.extend_from_slice(&[3, 1, 0x86, 0x00, 1, 0x00, 0x80]);
        let sizing: Vec<u8> = (0..6).flat_map(|b| [7, b]).collect();
        let mut mv = Vec::new();
        op_cf8(&mut mv, 1, 4);
        mv.extend_from_slice(&[1, 2 << 2]);
        mv.extend_from_slice(&0xd000_0000u32.to_le_bytes());
        mv.extend_from_slice(&[5, 0x14, 0, 0, 1]);
        let mut init = Vec::new();
        for (off, w, v) in [
            (0x14u16, 0u8, 1u64),
            (0x14, 0, 3),
            (0x08, 2, 1),
            (0x0c, 2, 1),
            (0x14, 0, 11),
            (0x16, 1, 0),
            (0x20, 3, 0x1000),
            (0x28, 3, 0x2000),
            (0x30, 3, 0x3000),
            (0x1c, 1, 1),
            (0x14, 0, 15),
            (0x14, 0, 0),
        ] {
            init.push(5);
            init.extend_from_slice(&off.to_le_bytes());
            init.push(w);
            let n = width(w, true);
            init.extend_from_slice(&v.to_le_bytes()[..n]);
        }
        vec![
            ("msix_enable", msix),
            ("bar_sizing", sizing),
            ("bar_move", mv),
            ("virtio_init_reset", init),
        ]
    }

    #[test]
    #[ignore = "writes the seed corpus; run with --ignored after changing the input format"]
    fn generate_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pci_config");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, v) in seeds() {
            std::fs::write(dir.join(name), v).unwrap();
        }
    }

    #[test]
    fn test_pci_seeds_keep_kvm_in_line_with_msix() {
        for (_, v) in seeds() {
            fuzz_one(&v);
        }
    }

    #[test]
    fn test_pci_msix_seed_registers_one_irqfd() {
        let (_, v) = seeds().into_iter().find(|s| s.0 == "msix_enable").unwrap();
        let rig = Rig::new(super::super::guest_memory());
        let mut r = Reader(&v);
        while !r.0.is_empty() {
            // Replay by hand to keep the rig: the same decoding as fuzz_one.
            let kind = r.u8();
            if kind == 5 {
                let (off, sel) = (r.u16(), r.u8());
                let n = width(sel, true);
                let b = r.bytes(n);
                let base = rig.dev().bar_address();
                rig.bus.write(base + u64::from(off), &b[..n]);
            } else {
                let (slot, off, sel) = (r.u8(), r.u16(), r.u8());
                let n = width(sel, false);
                let b = r.bytes(n);
                rig.bus.write(Rig::ecam_addr(slot, off), &b[..n]);
            }
        }
        rig.check();
        assert_eq!(rig.live_vectors(), vec![true, false, false]);
        assert_eq!(rig.kvm.state().irqfds.get(&0), Some(&1));
    }

    #[test]
    fn test_pci_corpus_replays_without_panic() {
        let n = super::super::replay_corpus("pci_config", fuzz_one);
        assert!(n > 0, "empty corpus");
    }
}
