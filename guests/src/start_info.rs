//! The PVH `hvm_start_info` the VMM passes in EBX: command line and memory map.

use crate::arch::mmio;

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// Longest command line kept.
pub const CMDLINE_MAX: usize = 1024;
/// Memory-map entries kept.
pub const MEMMAP_MAX: usize = 32;

/// One `hvm_memmap_table_entry`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// What the guest uses from `hvm_start_info`, copied out of VMM memory.
pub struct StartInfo {
    pub paddr: u64,
    pub valid: bool,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    pub memmap: [MemRegion; MEMMAP_MAX],
    pub memmap_entries: usize,
    /// Highest address of the structures read (start info, cmdline, memmap),
    /// so the allocator never hands them out.
    pub max_addr: u64,
}

impl StartInfo {
    /// Reads the structure at `paddr` (identity mapped). Tolerates a bad magic
    /// or version 0 (no memory map) by leaving those parts empty.
    pub fn read(paddr: u64) -> Self {
        let mut si = StartInfo {
            paddr,
            valid: false,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            memmap: [MemRegion::default(); MEMMAP_MAX],
            memmap_entries: 0,
            max_addr: paddr + 56,
        };
        if paddr == 0 || paddr >= 1 << 32 || mmio::read32(paddr) != START_INFO_MAGIC {
            return si;
        }
        si.valid = true;
        let version = mmio::read32(paddr + 4);
        let cmdline = read64(paddr + 24);
        if cmdline != 0 && cmdline < 1 << 32 {
            while si.cmdline_len < CMDLINE_MAX {
                let b = mmio::read8(cmdline + si.cmdline_len as u64);
                if b == 0 {
                    break;
                }
                si.cmdline[si.cmdline_len] = b;
                si.cmdline_len += 1;
            }
            si.max_addr = si.max_addr.max(cmdline + si.cmdline_len as u64 + 1);
        }
        if version >= 1 {
            let table = read64(paddr + 40);
            let entries = mmio::read32(paddr + 48) as usize;
            if table != 0 && table < 1 << 32 {
                for i in 0..entries.min(MEMMAP_MAX) {
                    let e = table + 24 * i as u64;
                    si.memmap[i] = MemRegion { addr: read64(e), size: read64(e + 8), kind: mmio::read32(e + 16) };
                }
                si.memmap_entries = entries.min(MEMMAP_MAX);
                si.max_addr = si.max_addr.max(table + 24 * entries as u64);
            }
        }
        si
    }

    /// The command line (lossy: non-UTF-8 bytes end it).
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// The RAM regions of the memory map.
    pub fn ram(&self) -> impl Iterator<Item = &MemRegion> {
        self.memmap[..self.memmap_entries].iter().filter(|r| r.kind == MEMMAP_TYPE_RAM)
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().map(|r| r.size).sum()
    }
}

fn read64(addr: u64) -> u64 {
    u64::from(mmio::read32(addr)) | (u64::from(mmio::read32(addr + 4)) << 32)
}
