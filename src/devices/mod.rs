//! Device models: legacy PC devices, the PCI bus and virtio devices.

pub mod legacy;
pub mod pci;
pub mod virtio;
