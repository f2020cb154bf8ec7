//! MSI-X: the vector table and PBA a driver programs, and the capability that points at
//! them. Delivery (GSI routes and irqfds) belongs to the transport that owns the vectors.

use crate::vmm::irq::MsiMessage;

pub const MSIX_CAP_ID: u8 = 0x11;
pub const ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector starts masked (PCI 3.0, 6.8.2.9).
        Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctrl: ENTRY_MASKED,
        }
    }
}

/// The MSI-X state of one function.
pub struct MsixTable {
    entries: Vec<Entry>,
    control: u16,
}

impl MsixTable {
    pub fn new(vectors: u16) -> Self {
        assert!((1..=2048).contains(&vectors));
        MsixTable {
            entries: vec![Entry::default(); vectors as usize],
            control: 0,
        }
    }

    pub fn num_vectors(&self) -> usize {
        self.entries.len()
    }

    /// The 12-byte capability body for config space (table and PBA in BAR `bar`).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = MSIX_CAP_ID;
        c[2..4].copy_from_slice(&(self.entries.len() as u16 - 1).to_le_bytes());
        c[4..8].copy_from_slice(&(table_offset | bar as u32).to_le_bytes());
        c[8..12].copy_from_slice(&(pba_offset | bar as u32).to_le_bytes());
        c
    }

    /// Message control as the guest reads it.
    pub fn control(&self) -> u16 {
        self.control | (self.entries.len() as u16 - 1)
    }

    /// A guest write to message control; only enable and function mask are writable.
    pub fn set_control(&mut self, v: u16) {
        self.control = v & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
    }

    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    /// The message vector `v` delivers now: `None` when MSI-X is off, the function or the
    /// vector is masked, or `v` is out of range (e.g. VIRTIO_MSI_NO_VECTOR).
    pub fn active(&self, v: u16) -> Option<MsiMessage> {
        let e = self.entries.get(v as usize)?;
        let live =
            self.enabled() && self.control & CTRL_FUNCTION_MASK == 0 && e.ctrl & ENTRY_MASKED == 0;
        live.then_some(MsiMessage {
            addr_lo: e.addr_lo,
            addr_hi: e.addr_hi,
            data: e.data,
        })
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (idx, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = self.entries.get(idx) else {
            data.fill(0);
            return;
        };
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
        raw[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
        raw[8..12].copy_from_slice(&e.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
        let start = field as usize;
        let end = (start + data.len()).min(16);
        data.fill(0);
        data[..end - start].copy_from_slice(&raw[start..end]);
    }

    /// A guest write to the table; returns the vector it touched.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Option<u16> {
        let (idx, field) = (
            (offset / ENTRY_SIZE) as usize,
            (offset % ENTRY_SIZE) as usize,
        );
        let e = self.entries.get_mut(idx)?;
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
        raw[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
        raw[8..12].copy_from_slice(&e.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
        let end = (field + data.len()).min(16);
        raw[field..end].copy_from_slice(&data[..end - field]);
        let word = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
        *e = Entry {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
            ctrl: word(12) & ENTRY_MASKED,
        };
        Some(idx as u16)
    }

    /// Pending bits: ringvm delivers through irqfds, where KVM keeps a masked vector's
    /// pending state in the eventfd and delivers it on unmask, so the PBA reads as zero.
    pub fn read_pba(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_inactive_until_enabled_and_unmasked() {
        let mut t = MsixTable::new(4);
        t.write_table(16, &0xfee0_0000u32.to_le_bytes());
        t.write_table(24, &0x41u32.to_le_bytes());
        assert_eq!(t.active(1), None, "masked at reset");
        t.write_table(28, &0u32.to_le_bytes());
        assert_eq!(t.active(1), None, "MSI-X not enabled");
        t.set_control(CTRL_ENABLE);
        assert_eq!(
            t.active(1),
            Some(MsiMessage {
                addr_lo: 0xfee0_0000,
                addr_hi: 0,
                data: 0x41
            })
        );
        t.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert_eq!(t.active(1), None, "function mask");
        assert_eq!(t.active(0xffff), None, "NO_VECTOR");
    }

    #[test]
    fn test_table_out_of_range_write_ignored() {
        let mut t = MsixTable::new(2);
        assert_eq!(t.write_table(64, &[1, 2, 3, 4]), None);
        let mut b = [0xffu8; 4];
        t.read_table(64, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn test_capability_encodes_size_and_offsets() {
        let t = MsixTable::new(3);
        let c = t.capability(0, 0x4000, 0x6000);
        assert_eq!(c[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([c[2], c[3]]), 2);
        assert_eq!(u32::from_le_bytes(c[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(t.control(), 2);
    }
}
