//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC), bus-0 enumeration,
//! BAR sizing, placing unassigned BARs in the identity-mapped MMIO hole, and
//! moving 64-bit BARs to a given address (blkbench `bar64=`).

use crate::arch::{inb, inl, inw, outb, outl, outw};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub const VENDOR_ID: u8 = 0x00;
pub const DEVICE_ID: u8 = 0x02;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const HEADER_TYPE: u8 = 0x0e;
pub const BAR0: u8 = 0x10;
pub const CAP_PTR: u8 = 0x34;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const STATUS_CAP_LIST: u16 = 1 << 4;

/// Where BARs may be moved: the part of the 32-bit MMIO hole below the
/// IOAPIC/HPET/LAPIC region (and above q35's ECAM at 0xB000_0000).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0xfec0_0000;

/// A function on bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Function {
    fn address(self, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.bus) << 16)
            | (u32::from(self.dev) << 11)
            | (u32::from(self.func) << 8)
            | u32::from(offset & 0xfc)
    }
    pub fn read32(self, offset: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inl(CONFIG_DATA)
    }
    pub fn read16(self, offset: u8) -> u16 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inw(CONFIG_DATA + u16::from(offset & 2))
    }
    pub fn read8(self, offset: u8) -> u8 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inb(CONFIG_DATA + u16::from(offset & 3))
    }
    pub fn write32(self, offset: u8, v: u32) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outl(CONFIG_DATA, v);
    }
    pub fn write16(self, offset: u8, v: u16) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outw(CONFIG_DATA + u16::from(offset & 2), v);
    }
    pub fn write8(self, offset: u8, v: u8) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outb(CONFIG_DATA + u16::from(offset & 3), v);
    }

    pub fn vendor_device(self) -> (u16, u16) {
        let v = self.read32(VENDOR_ID);
        (v as u16, (v >> 16) as u16)
    }

    /// Capability list entries as (offset, id).
    pub fn capabilities(self) -> Capabilities {
        let next = if self.read16(STATUS) & STATUS_CAP_LIST != 0 { self.read8(CAP_PTR) & 0xfc } else { 0 };
        Capabilities { func: self, next, budget: 48 }
    }

    /// Reads BAR `n`: its address, size and whether it is 64-bit (memory BARs only).
    /// Sizing writes all-ones, so callers disable decoding around it.
    pub fn memory_bar(self, n: u8) -> Option<Bar> {
        let off = BAR0 + 4 * n;
        let lo = self.read32(off);
        if lo & 1 != 0 {
            return None;
        }
        let is64 = (lo >> 1) & 3 == 2;
        let hi = if is64 { self.read32(off + 4) } else { 0 };
        self.write32(off, 0xffff_ffff);
        let size_lo = self.read32(off) & !0xf;
        self.write32(off, lo);
        let size_hi = if is64 {
            self.write32(off + 4, 0xffff_ffff);
            let s = self.read32(off + 4);
            self.write32(off + 4, hi);
            s
        } else {
            0xffff_ffff
        };
        let mask = (u64::from(size_hi) << 32) | u64::from(size_lo);
        if mask == 0 || (!is64 && size_lo == 0) {
            return None;
        }
        let size = (!mask).wrapping_add(1) & if is64 { u64::MAX } else { 0xffff_ffff };
        Some(Bar { index: n, addr: (u64::from(hi) << 32) | u64::from(lo & !0xf), size, is64 })
    }

    /// Programs memory BAR `n` with `addr` (decoding must be off).
    pub fn set_memory_bar(self, bar: &Bar, addr: u64) {
        let off = BAR0 + 4 * bar.index;
        let lo = self.read32(off) & 0xf;
        self.write32(off, (addr as u32 & !0xf) | lo);
        if bar.is64 {
            self.write32(off + 4, (addr >> 32) as u32);
        }
    }

    fn is_multifunction(self) -> bool {
        self.read8(HEADER_TYPE) & 0x80 != 0
    }

    fn header_type(self) -> u8 {
        self.read8(HEADER_TYPE) & 0x7f
    }
}

/// A memory BAR.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub index: u8,
    pub addr: u64,
    pub size: u64,
    pub is64: bool,
}

/// Iterator over a capability list.
pub struct Capabilities {
    func: Function,
    next: u8,
    budget: u8,
}

impl Iterator for Capabilities {
    type Item = (u8, u8);
    fn next(&mut self) -> Option<(u8, u8)> {
        if self.next < 0x40 || self.budget == 0 {
            return None;
        }
        self.budget -= 1;
        let off = self.next;
        let word = self.func.read16(off);
        self.next = (word >> 8) as u8 & 0xfc;
        Some((off, word as u8))
    }
}

/// Every present function on bus 0.
pub fn bus0_functions() -> impl Iterator<Item = Function> {
    (0u8..32).flat_map(|dev| {
        let f0 = Function { bus: 0, dev, func: 0 };
        let present = f0.vendor_device().0 != 0xffff;
        let nfunc = if !present {
            0
        } else if f0.is_multifunction() {
            8
        } else {
            1
        };
        (0..nfunc).map(move |func| Function { bus: 0, dev, func }).filter(|f| f.vendor_device().0 != 0xffff)
    })
}

/// Moves every BAR of `target` listed in `bars` that is unassigned or not
/// below 4 GiB into a free, naturally aligned range of the MMIO hole, away
/// from the BARs of all other bus-0 functions and from `reserved` (the
/// memory map: RAM and firmware ranges). Returns false if no room.
pub fn place_bars_below_4g(target: Function, bars: &mut [Bar], reserved: &[(u64, u64)]) -> bool {
    let mut used: [(u64, u64); 96] = [(0, 0); 96];
    let mut nused = 0;
    for &r in reserved.iter().take(32) {
        used[nused] = r;
        nused += 1;
    }
    for f in bus0_functions() {
        let nbars = if f.header_type() == 0 { 6 } else { 2 };
        let cmd = f.read16(COMMAND);
        f.write16(COMMAND, cmd & !(COMMAND_MEMORY | COMMAND_IO));
        let mut n = 0;
        while n < nbars {
            let bar = f.memory_bar(n);
            if let Some(b) = bar {
                if (f != target || bars.iter().all(|t| t.index != b.index)) && b.addr != 0 && nused < used.len() {
                    used[nused] = (b.addr, b.addr + b.size);
                    nused += 1;
                }
                n += if b.is64 { 2 } else { 1 };
            } else {
                n += 1;
            }
        }
        f.write16(COMMAND, cmd);
    }
    let cmd = target.read16(COMMAND);
    target.write16(COMMAND, cmd & !COMMAND_MEMORY);
    for i in 0..bars.len() {
        let b = bars[i];
        // Below 4 GiB the identity map already covers it (MMIO traps to the VMM whatever the cache type).
        if b.addr != 0 && b.addr + b.size <= 1 << 32 {
            continue;
        }
        let Some(addr) = find_free(&used[..nused], b.size) else {
            target.write16(COMMAND, cmd);
            return false;
        };
        target.set_memory_bar(&b, addr);
        bars[i].addr = addr;
        if nused < used.len() {
            used[nused] = (addr, addr + b.size);
            nused += 1;
        }
    }
    target.write16(COMMAND, cmd);
    true
}

/// Moves every 64-bit BAR in `bars` to `at` and up (each naturally aligned, in
/// order), with memory decoding off meanwhile; returns whether any moved. The
/// caller maps the new addresses.
pub fn place_bars_at(target: Function, bars: &mut [Bar], at: u64) -> bool {
    let cmd = target.read16(COMMAND);
    target.write16(COMMAND, cmd & !COMMAND_MEMORY);
    let mut next = at;
    let mut moved = false;
    for b in bars.iter_mut().filter(|b| b.is64) {
        let addr = next.next_multiple_of(b.size.max(16));
        target.set_memory_bar(b, addr);
        moved |= addr != b.addr;
        b.addr = addr;
        next = addr + b.size;
    }
    target.write16(COMMAND, cmd);
    moved
}

/// Lowest naturally aligned `size` range in the MMIO hole overlapping nothing in `used`.
fn find_free(used: &[(u64, u64)], size: u64) -> Option<u64> {
    let size = size.max(4096).next_power_of_two();
    let mut addr = MMIO_HOLE_START;
    'search: while addr + size <= MMIO_HOLE_END {
        for &(start, end) in used {
            if addr < end && start < addr + size {
                addr = (end + size - 1) & !(size - 1);
                continue 'search;
            }
        }
        return Some(addr);
    }
    None
}
