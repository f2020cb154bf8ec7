//! A type-0 configuration space: identity registers, writable masks, BAR sizing and a
//! capability list. Guest writes only reach bits the mask allows.

pub const NUM_REGS: usize = 1024; // 4 KiB, the PCIe extended space reachable through ECAM
const BAR0_REG: usize = 4;
const NUM_BARS: usize = 6;
const COMMAND_REG: usize = 1;
const CAP_PTR_REG: usize = 13;
const STATUS_CAP_LIST: u32 = 1 << 20;
const FIRST_CAP_OFFSET: usize = 0x40;
const BAR_MEM_64: u32 = 0x4;
/// x86-64's architectural limit on physical addresses (52 bits): a BAR ending above it is a
/// sizing pattern, not an address.
const MAX_BAR_END: u64 = 1 << 52;

/// A BAR the guest asked to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub old: u64,
    pub new: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bar {
    addr: u64,
    size: u64,
    is64: bool,
}

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

pub struct PciConfig {
    regs: Vec<u32>,
    wmask: Vec<u32>,
    bars: [Option<Bar>; NUM_BARS],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> Self {
        let mut regs = vec![0u32; NUM_REGS];
        let mut wmask = vec![0u32; NUM_REGS];
        regs[0] = (ids.device as u32) << 16 | ids.vendor as u32;
        regs[2] = (ids.class as u32) << 24
            | (ids.subclass as u32) << 16
            | (ids.prog_if as u32) << 8
            | ids.revision as u32;
        regs[11] = (ids.subsystem as u32) << 16 | ids.subsystem_vendor as u32;
        // Command: I/O, memory, bus master, interrupt disable are writable.
        wmask[COMMAND_REG] = 0x0000_0407;
        // Interrupt line is scratch space for the OS.
        wmask[15] = 0xff;
        PciConfig {
            regs,
            wmask,
            bars: [None; NUM_BARS],
            next_cap: FIRST_CAP_OFFSET,
            last_cap: None,
        }
    }

    /// Declares BAR `idx` as a memory BAR of `size` bytes (a power of two) at `addr`.
    pub fn add_mem_bar(&mut self, idx: usize, addr: u64, size: u64, is64: bool) {
        assert!(
            size.is_power_of_two() && size >= 16,
            "BAR size must be a power of two"
        );
        self.bars[idx] = Some(Bar { addr, size, is64 });
        let flags = if is64 { BAR_MEM_64 } else { 0 };
        // Address bits are those above the size; a 64-bit BAR's high half holds the rest.
        let mask = !(size - 1);
        self.regs[BAR0_REG + idx] = (addr & mask) as u32 | flags;
        self.wmask[BAR0_REG + idx] = mask as u32 & !0xf;
        if is64 {
            self.regs[BAR0_REG + idx + 1] = ((addr & mask) >> 32) as u32;
            self.wmask[BAR0_REG + idx + 1] = (mask >> 32) as u32;
        }
    }

    /// Appends a capability (its first byte is the id, the second is overwritten with the
    /// next pointer); returns its offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8]) -> usize {
        let off = self.next_cap;
        let mut bytes = body.to_vec();
        bytes[1] = 0;
        self.write_bytes(off, &bytes);
        match self.last_cap {
            Some(prev) => self.write_bytes(prev + 1, &[off as u8]),
            None => {
                self.regs[CAP_PTR_REG] = off as u32;
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + bytes.len() + 3) & !3;
        off
    }

    /// Makes `mask` of register `reg` writable by the guest.
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        self.wmask[reg] = mask;
    }

    fn write_bytes(&mut self, off: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let (reg, shift) = ((off + i) / 4, ((off + i) % 4) * 8);
            self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | (*b as u32) << shift;
        }
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Reads `len` bytes at byte offset `off` as little-endian.
    pub fn read_bytes(&self, off: usize, len: usize) -> u32 {
        let mut v = 0u32;
        for i in 0..len.min(4) {
            let (reg, shift) = ((off + i) / 4, ((off + i) % 4) * 8);
            v |= ((self.read(reg) >> shift) & 0xff) << (i * 8);
        }
        v
    }

    /// Applies a guest write through the writable mask; reports a BAR the write moved.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        if reg >= NUM_REGS || offset as usize + data.len() > 4 {
            return None;
        }
        let mut value = self.regs[reg];
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset as usize + i) * 8;
            value = (value & !(0xff << shift)) | (*b as u32) << shift;
            mask |= 0xff << shift;
        }
        let wm = self.wmask[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !wm) | (value & wm);
        self.bar_write(reg)
    }

    fn bar_write(&mut self, reg: usize) -> Option<BarMove> {
        if !(BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return None;
        }
        let idx = match self.bars[reg - BAR0_REG] {
            Some(_) => reg - BAR0_REG,
            None if reg > BAR0_REG && self.bars[reg - BAR0_REG - 1].is_some_and(|b| b.is64) => {
                reg - BAR0_REG - 1
            }
            None => return None,
        };
        let bar = self.bars[idx]?;
        let lo = (self.regs[BAR0_REG + idx] & !0xf) as u64;
        let hi = if bar.is64 {
            self.regs[BAR0_REG + idx + 1] as u64
        } else {
            0
        };
        let new = hi << 32 | lo;
        let probing = (self.regs[BAR0_REG + idx] | 0xf) == (self.wmask[BAR0_REG + idx] | 0xf);
        // Sizing writes all-ones to each half in turn and then restores them, so between
        // the two halves a 64-bit BAR reads as an address above any CPU's physical address
        // width: that is no move. A move written low half first passes through one
        // in-between address, which is mapped like any other (QEMU does the same).
        if probing || new == bar.addr || new == 0 || new.saturating_add(bar.size) > MAX_BAR_END {
            return None;
        }
        self.bars[idx] = Some(Bar { addr: new, ..bar });
        Some(BarMove {
            bar: idx,
            old: bar.addr,
            new,
            len: bar.size,
        })
    }

    /// (index, address, size) of each BAR.
    pub fn bars(&self) -> Vec<(usize, u64, u64)> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b.addr, b.size)))
            .collect()
    }

    /// Whether the guest enabled memory decoding.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & 0x2 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    #[test]
    fn test_bar_sizing_returns_size_mask_and_does_not_move() {
        let mut c = cfg();
        c.add_mem_bar(0, 0xc000_0000, 0x8000, false);
        assert_eq!(c.write(4, 0, &0xffff_ffffu32.to_le_bytes()), None);
        assert_eq!(c.read(4), 0xffff_8000);
        assert_eq!(
            c.write(4, 0, &0xc000_0000u32.to_le_bytes()),
            None,
            "restoring the old address is no move"
        );
        assert_eq!(c.read(4), 0xc000_0000);
    }

    #[test]
    fn test_bar_relocation_reported() {
        let mut c = cfg();
        c.add_mem_bar(0, 0xc000_0000, 0x8000, false);
        let m = c.write(4, 0, &0xd000_0000u32.to_le_bytes()).unwrap();
        assert_eq!(
            m,
            BarMove {
                bar: 0,
                old: 0xc000_0000,
                new: 0xd000_0000,
                len: 0x8000
            }
        );
        assert_eq!(c.bars(), vec![(0, 0xd000_0000, 0x8000)]);
    }

    /// Writes `v` to configuration register `reg` as a driver does (one dword).
    fn w(c: &mut PciConfig, reg: usize, v: u32) -> Option<BarMove> {
        c.write(reg, 0, &v.to_le_bytes())
    }

    #[test]
    fn test_bar64_sizing_both_halves_reads_mask_and_does_not_move() {
        let mut c = cfg();
        c.add_mem_bar(0, 0x1_0000_0000, 0x8000, true);
        assert_eq!(
            c.read(4),
            BAR_MEM_64,
            "low half: address bits 0 and the 64-bit type"
        );
        assert_eq!(c.read(5), 1);
        // Linux's order: low half to all-ones, read, restore; then the high half.
        assert_eq!(w(&mut c, 4, 0xffff_ffff), None);
        assert_eq!(c.read(4), 0xffff_8000 | BAR_MEM_64);
        assert_eq!(w(&mut c, 4, 0), None, "restoring the low half");
        assert_eq!(w(&mut c, 5, 0xffff_ffff), None);
        assert_eq!(
            c.read(5),
            0xffff_ffff,
            "a 32 KiB BAR: the whole high half is address"
        );
        assert_eq!(w(&mut c, 5, 1), None, "restoring the high half");
        // Both halves at all-ones at once, then restored low half first.
        assert_eq!(w(&mut c, 4, 0xffff_ffff), None);
        assert_eq!(w(&mut c, 5, 0xffff_ffff), None);
        assert_eq!(w(&mut c, 4, 0), None, "0xffffffff_00000000 is no address");
        assert_eq!(w(&mut c, 5, 1), None);
        assert_eq!(c.bars(), vec![(0, 0x1_0000_0000, 0x8000)]);
    }

    #[test]
    fn test_bar64_relocation_low_then_high_ends_at_the_full_address() {
        let mut c = cfg();
        c.add_mem_bar(2, 0x1_0000_0000, 0x8000, true);
        // 256 GiB (where Firecracker puts its BARs): the low half is 0, only the high moves.
        assert_eq!(w(&mut c, 6, 0), None, "low half unchanged");
        let m = w(&mut c, 7, 0x40).expect("the high half moves the BAR");
        assert_eq!(
            m,
            BarMove {
                bar: 2,
                old: 0x1_0000_0000,
                new: 0x40_0000_0000,
                len: 0x8000
            }
        );
        // Low half first: one move through (old high : new low), then the final one.
        let a = w(&mut c, 6, 0xc000_0000).expect("low half moves");
        assert_eq!((a.old, a.new), (0x40_0000_0000, 0x40_c000_0000));
        let b = w(&mut c, 7, 0).expect("high half moves");
        assert_eq!((b.old, b.new), (0x40_c000_0000, 0xc000_0000));
        assert_eq!(c.bars(), vec![(2, 0xc000_0000, 0x8000)]);
        assert_eq!(c.read(6), 0xc000_0000 | BAR_MEM_64);
        assert_eq!(c.read(7), 0);
    }

    #[test]
    fn test_bar64_byte_writes_and_address_zero_do_not_move() {
        let mut c = cfg();
        c.add_mem_bar(0, 0x2_0000_0000, 0x8000, true);
        // Unaligned address bits are not writable: the BAR stays aligned to its size.
        assert_eq!(
            c.write(4, 1, &[0x12]),
            None,
            "bits 8-15 of a 32 KiB BAR are not address"
        );
        assert_eq!(c.read(4), BAR_MEM_64);
        assert_eq!(w(&mut c, 5, 0), None, "0 means unassigned");
        let m = w(&mut c, 5, 3).expect("a move within the high half");
        assert_eq!(m.new, 0x3_0000_0000);
        // The upper byte of the high half alone puts it beyond 52 bits: no move.
        assert_eq!(c.write(5, 3, &[0xff]), None);
        assert_eq!(c.bars(), vec![(0, 0x3_0000_0000, 0x8000)]);
    }

    #[test]
    fn test_bar64_larger_than_4g_masks_high_half() {
        let mut c = cfg();
        c.add_mem_bar(0, 0x100_0000_0000, 1 << 33, true);
        assert_eq!(w(&mut c, 4, 0xffff_ffff), None);
        assert_eq!(w(&mut c, 5, 0xffff_ffff), None);
        assert_eq!(c.read(4), BAR_MEM_64, "no address bits in the low half");
        assert_eq!(
            c.read(5),
            0xffff_fffe,
            "8 GiB: bit 0 of the high half is size"
        );
    }

    #[test]
    fn test_capability_chain_links() {
        let mut c = cfg();
        let a = c.add_capability(&[0x09, 0, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let b = c.add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.read(13) & 0xff, a as u32);
        assert_eq!(c.read_bytes(a + 1, 1), b as u32);
        assert_eq!(c.read_bytes(b + 1, 1), 0);
        assert_ne!(c.read(1) & STATUS_CAP_LIST, 0);
    }

    #[test]
    fn test_readonly_identity_ignores_writes() {
        let mut c = cfg();
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x1042_1af4);
    }
}
