//! PCI: the root complex (configuration mechanism #1 and ECAM), generic configuration
//! space with BARs and capabilities, and MSI-X.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarMove, PciConfig};
pub use root::PciRoot;

/// A function on bus 0.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (dword index).
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` within register `reg`; returns a BAR relocation for the
    /// root complex to carry out on the MMIO bus.
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove>;
    /// An MMIO read inside BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// An MMIO write inside BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now lives at `new`: move anything keyed on its address (ioeventfds).
    fn bar_moved(&mut self, _bar: usize, _old: u64, _new: u64) {}
    /// Where each BAR currently is: (bar index, address, size).
    fn bars(&self) -> Vec<(usize, u64, u64)>;
}

/// Errors from building the PCI topology.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("No free PCI slot on bus 0")]
    NoSlot,
    #[error("No room for a {size:#x}-byte BAR in the PCI MMIO window")]
    NoBarSpace { size: u64 },
    #[error("Failed to map a BAR on the MMIO bus")]
    Bus(#[from] crate::vmm::bus::BusError),
    #[error("The MMIO bus is gone (the VM is being torn down)")]
    NoBus,
}
