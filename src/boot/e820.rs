//! The guest's physical memory map, shared by the PVH memmap and Linux's e820 table.

use crate::vmm::layout::*;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map of a guest with `mem_size` bytes of RAM.
pub fn memory_map(mem_size: u64) -> Vec<MemoryRange> {
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        MemoryRange {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemoryRange {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            kind: E820_RESERVED,
        },
        MemoryRange {
            addr: HIGH_MEMORY_START,
            size: low_end - HIGH_MEMORY_START,
            kind: E820_RAM,
        },
        MemoryRange {
            addr: PCI_ECAM_START,
            size: PCI_ECAM_SIZE,
            kind: E820_RESERVED,
        },
    ];
    if mem_size > low_end {
        map.push(MemoryRange {
            addr: HIGH_RAM_START,
            size: mem_size - low_end,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_memory_map_ram_adds_up_to_memory_size() {
        for size in [64u64 << 20, 3 << 30, 6 << 30] {
            let map = memory_map(size);
            let ram: u64 = map
                .iter()
                .filter(|r| r.kind == E820_RAM)
                .map(|r| r.size)
                .sum();
            // The 384 KiB between the EBDA and 1 MiB are reserved, not RAM.
            assert_eq!(ram, size - (HIGH_MEMORY_START - EBDA_START), "size {size}");
        }
    }

    #[test]
    fn test_memory_map_never_overlaps_mmio_hole() {
        for r in memory_map(8 << 30).iter().filter(|r| r.kind == E820_RAM) {
            assert!(
                r.addr + r.size <= MMIO_HOLE_START || r.addr >= HIGH_RAM_START,
                "{r:?}"
            );
        }
    }
}
