//! The PVH boot ABI (Xen's `hvm_start_info`): magic, command line, memory map and the
//! initrd as module 0.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress};

use super::e820::memory_map;
use super::{BootError, Initrd};
use crate::devices::virtio::GuestMemory;
use crate::vmm::layout::{CMDLINE_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR};

pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes `hvm_start_info` and its tables; returns its guest address (EBX at entry).
pub fn write_start_info(
    mem: &GuestMemory,
    mem_size: u64,
    rsdp: u64,
    initrd: Option<Initrd>,
) -> Result<u64, BootError> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(mem_size)
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.addr,
            size: r.size,
            type_: r.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.addr.raw_value(),
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_START_INFO_ADDR));
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(|e| BootError::Params(e.to_string()))?;
    Ok(PVH_START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn test_start_info_has_magic_memmap_and_module() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let initrd = Initrd {
            addr: GuestAddress(0x200_0000),
            size: 1234,
        };
        let at = write_start_info(&mem, 64 << 20, 0xe_0000, Some(initrd)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.memmap_entries as usize, memory_map(64 << 20).len());
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, 1));
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x200_0000, 1234));
    }
}
