//! virtio-pci modern transport.
