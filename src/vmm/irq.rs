//! KVM GSI routing: the IOAPIC/PIC pins plus one MSI route per allocated MSI-X vector.
//! Only the control path (a driver programming its MSI-X table) changes it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::layout::MSI_GSI_START;

const IOAPIC_PINS: u32 = 24;
const MAX_GSI: u32 = 1024;

/// Errors from changing interrupt routing.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("Out of GSIs for MSI routes")]
    Exhausted,
    #[error("Failed to set KVM GSI routing")]
    SetRouting(#[source] kvm_ioctls::Error),
}

/// An MSI message as the guest wrote it into an MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

struct State {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// What a virtio-pci function needs from the VM for notifications and interrupts: MSI
/// routes, irqfds and MMIO ioeventfds. [`IrqRouter`] is the KVM implementation; the fuzz
/// harness uses a recording fake, so the transport can be driven without /dev/kvm.
pub trait VmInterrupts: Send {
    /// Reserves a GSI for an MSI vector.
    fn allocate_gsi(&self) -> Result<u32, IrqError>;
    /// Points `gsi` at `msg` (or removes its route with `None`).
    fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError>;
    /// Raises `gsi` whenever `fd` is written.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    /// Signals `fd` on every guest write to MMIO address `addr`, without an exit.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error>;
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error>;
}

impl VmInterrupts for IrqRouter {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        IrqRouter::allocate_gsi(self)
    }
    fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        IrqRouter::set_msi(self, gsi, msg)
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.vm.register_irqfd(fd, gsi)
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.vm.unregister_irqfd(fd, gsi)
    }
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
}

/// Owner of the VM's GSI routing table.
#[derive(Clone)]
pub struct IrqRouter {
    vm: Arc<VmFd>,
    state: Arc<Mutex<State>>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouter {
            vm,
            state: Arc::new(Mutex::new(State {
                msi: BTreeMap::new(),
                next_gsi: MSI_GSI_START,
            })),
        }
    }

    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Reserves a GSI for an MSI vector.
    pub fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.next_gsi >= MAX_GSI {
            return Err(IrqError::Exhausted);
        }
        s.next_gsi += 1;
        Ok(s.next_gsi - 1)
    }

    /// Points `gsi` at `msg` (or removes its route with `None`) and updates KVM.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match msg {
            Some(m) => s.msi.insert(gsi, m) != Some(m),
            None => s.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&s)?;
        }
        Ok(())
    }

    /// Installs the legacy pin routes; call once after creating the irqchip.
    pub fn init(&self) -> Result<(), IrqError> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.commit(&s)
    }

    fn commit(&self, s: &State) -> Result<(), IrqError> {
        let mut entries = Vec::with_capacity(16 + IOAPIC_PINS as usize + s.msi.len());
        for pin in 0..16 {
            if pin == 2 {
                continue; // the PIC cascade
            }
            let chip = if pin < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_entry(pin, chip, pin % 8));
        }
        for pin in 0..IOAPIC_PINS {
            // ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2, as on a PC.
            let target = if pin == 0 { 2 } else { pin };
            entries.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, target));
        }
        for (gsi, m) in &s.msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.addr_lo;
            e.u.msi.address_hi = m.addr_hi;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::Exhausted)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(IrqError::SetRouting)
    }
}
