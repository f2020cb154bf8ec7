//! Dispatch of port I/O and MMIO exits to device models.
//!
//! Only the control path goes through here (configuration, the serial console, the exit
//! port): every data-path guest access (virtqueue notifies) is caught by a KVM ioeventfd
//! and never leaves the kernel, so a lock per exit costs nothing that matters.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on the PIO or MMIO bus. `offset` is relative to the range's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from (un)registering bus ranges.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("Bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("Bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("No device registered at {0:#x}")]
    NotFound(u64),
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// An address space (PIO or MMIO) of non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` for `[base, base + len)`.
    pub fn insert(
        &self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let overlaps_before = ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        let overlaps_after = ranges.range(base..base + len).next().is_some();
        if overlaps_before || overlaps_after {
            return Err(BusError::Overlap { base, len });
        }
        ranges.insert(base, (len, dev));
        Ok(())
    }

    /// Removes the range starting at `base` (a BAR being moved by the guest).
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotFound(base))
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, (len, dev)) = ranges.range(..=addr).next_back()?;
        (addr - base < *len).then(|| (*base, dev.clone()))
    }

    /// Reads from the device at `addr`; returns false (data filled with 0xff) when none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when none is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn test_bus_dispatch_offset_relative_to_base() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, 7)]);
    }

    #[test]
    fn test_bus_unmapped_read_returns_ones() {
        let bus = Bus::new();
        let mut b = [0u8; 2];
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn test_bus_overlap_rejected() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(vec![]))), 0x100, 0x10)
            .unwrap();
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(vec![]))), 0x108, 0x10)
            .is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(vec![]))), 0xf8, 0x10)
            .is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(vec![]))), 0x110, 0x10)
            .is_ok());
        bus.remove(0x100).unwrap();
        assert!(!bus.write(0x100, &[1]));
    }
}
