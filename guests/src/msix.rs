//! PCI MSI-X from the driver's side: find the capability, locate the vector table in its
//! BAR, point vectors at the local APIC and turn MSI-X on.

use crate::arch::mmio;
use crate::pci::{Function, BAR0};

const CAP_MSIX: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;

/// Why MSI-X could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixError {
    /// The function has no MSI-X capability.
    NoCapability,
    /// The table's BAR is unassigned, an I/O BAR, or where the page tables do not reach.
    TableNotMapped,
    /// The function has fewer vectors than asked for.
    TooFewVectors { have: u16 },
}

/// A function's MSI-X capability and the table it points at.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    func: Function,
    cap: u8,
    /// Guest-physical address of entry 0.
    pub table: u64,
    pub vectors: u16,
}

impl Msix {
    /// Finds the capability and the table's address (read from its BAR as assigned).
    /// `mapped(start, end)` says whether the guest's page tables cover that range.
    pub fn find(func: Function, mapped: impl Fn(u64, u64) -> bool) -> Result<Msix, MsixError> {
        let cap = func.capabilities().find(|&(_, id)| id == CAP_MSIX).map(|(off, _)| off).ok_or(MsixError::NoCapability)?;
        let vectors = (func.read16(cap + 2) & 0x7ff) + 1;
        let table_reg = func.read32(cap + 4);
        let bir = (table_reg & 7) as u8;
        if bir > 5 {
            return Err(MsixError::TableNotMapped);
        }
        let lo = func.read32(BAR0 + 4 * bir);
        if lo & 1 != 0 {
            return Err(MsixError::TableNotMapped);
        }
        let hi = if (lo >> 1) & 3 == 2 && bir < 5 { func.read32(BAR0 + 4 * bir + 4) } else { 0 };
        let base = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        let table = base + u64::from(table_reg & !7);
        let end = table + ENTRY_SIZE * u64::from(vectors);
        if base == 0 || !mapped(table, end) {
            return Err(MsixError::TableNotMapped);
        }
        Ok(Msix { func, cap, table, vectors })
    }

    /// Points entries `0..n` at `msi_address` with data `first_vector + i` (fixed delivery,
    /// edge), unmasked, then enables MSI-X with the function unmasked. The virtio vectors
    /// (queue_msix_vector) are set by the caller.
    pub fn enable(&self, n: u16, msi_address: u32, first_vector: u8) -> Result<(), MsixError> {
        if n > self.vectors {
            return Err(MsixError::TooFewVectors { have: self.vectors });
        }
        let ctrl_reg = self.cap + 2;
        let ctrl = self.func.read16(ctrl_reg);
        // Enabled with the whole function masked while the table changes (PCI 3.0 6.8.2.3).
        self.func.write16(ctrl_reg, ctrl | CTRL_ENABLE | CTRL_FUNCTION_MASK);
        // Entries past n stay masked, as they are after reset (each write is a VM exit).
        for i in 0..u64::from(n) {
            let e = self.table + ENTRY_SIZE * i;
            mmio::write32(e, msi_address);
            mmio::write32(e + 4, 0);
            mmio::write32(e + 8, u32::from(first_vector) + i as u32);
            mmio::write32(e + 12, 0);
        }
        self.func.write16(ctrl_reg, (ctrl | CTRL_ENABLE) & !CTRL_FUNCTION_MASK);
        Ok(())
    }

    /// Turns MSI-X off again (after the device is reset).
    pub fn disable(&self) {
        let ctrl_reg = self.cap + 2;
        let ctrl = self.func.read16(ctrl_reg);
        self.func.write16(ctrl_reg, ctrl & !CTRL_ENABLE);
    }
}
