//! The guest physical address map every part of ringvm agrees on.
//!
//! ```text
//! 0x0000_0000  RAM (low)            boot structures, the kernel, the initrd
//! 0xC000_0000  32-bit MMIO hole     PCI BARs (0xC000_0000..0xE000_0000), ECAM,
//!                                   IOAPIC, LAPIC, KVM's TSS and identity map
//! 0x1_0000_0000 RAM (high)          whatever did not fit below the hole
//! above RAM    64-bit PCI BARs      only with --pci-bars high (64 GiB window)
//! ```

/// Start of the 32-bit MMIO hole; RAM below it is "low" memory.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole; RAM above 3 GiB continues here.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Window for 32-bit PCI BARs.
pub const PCI_MMIO_START: u64 = 0xC000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// Size of the window for 64-bit PCI BARs (`--pci-bars high`), placed above guest RAM.
pub const PCI_MMIO64_SIZE: u64 = 1 << 36;
/// Alignment of that window's base.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// PCI Express enhanced configuration space (ECAM); ringvm emulates bus 0 only.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
pub const PCI_ECAM_BUS0_SIZE: u64 = 0x10_0000;

pub const IOAPIC_START: u64 = 0xFEC0_0000;
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Addresses KVM needs for its real-mode TSS and identity map (Intel VMX).
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFFFB_C000;

/// End of conventional memory below 1 MiB (the EBDA/VGA/BIOS area above it is reserved).
pub const EBDA_START: u64 = 0x9_FC00;
/// Where a kernel's image may start.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Boot structures (all below the EBDA).
pub const BOOT_GDT_ADDR: u64 = 0x500;
pub const BOOT_IDT_ADDR: u64 = 0x520;
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;
pub const MPTABLE_ADDR: u64 = 0x9_FC00;
/// ACPI tables (RSDP first, where Linux also scans for it) in the reserved BIOS area.
pub const ACPI_START: u64 = 0xE_0000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;

/// Legacy interrupt lines (IOAPIC pins) of the devices ringvm emulates.
pub const SERIAL_IRQ: u32 = 4;
/// First GSI handed to MSI routes; below it are the 24 IOAPIC pins.
pub const MSI_GSI_START: u32 = 24;

/// End of guest RAM for `mem_size` bytes: below the hole, or continued from 4 GiB.
pub fn ram_end(mem_size: u64) -> u64 {
    if mem_size <= MMIO_HOLE_START {
        mem_size
    } else {
        HIGH_RAM_START + (mem_size - MMIO_HOLE_START)
    }
}
