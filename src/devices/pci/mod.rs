//! PCI root complex, configuration space and MSI-X.
