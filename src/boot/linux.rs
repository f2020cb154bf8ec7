//! The Linux x86 64-bit boot protocol: a zero page (`boot_params`) with the setup header,
//! the e820 map, the command line and the initrd.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, GuestAddress};

use super::e820::memory_map;
use super::{BootError, BootSpec, Initrd};
use crate::devices::virtio::GuestMemory;
use crate::vmm::layout::{CMDLINE_ADDR, ZERO_PAGE_ADDR};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Builds `boot_params` for the kernel (with the bzImage's own setup header when there is
/// one); returns the zero page's guest address (RSI at entry).
pub fn build_boot_params(
    header: Option<setup_header>,
    spec: &BootSpec,
    initrd: Option<Initrd>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = spec.cmdline.len() as u32 + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr.raw_value() as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = memory_map(spec.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Params(format!(
            "{} e820 entries do not fit the zero page",
            map.len()
        )));
    }
    for (slot, r) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: r.addr,
            size: r.size,
            r#type: r.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes `boot_params` into guest memory at [`ZERO_PAGE_ADDR`].
pub fn write_boot_params(
    mem: &GuestMemory,
    header: Option<setup_header>,
    spec: &BootSpec,
    initrd: Option<Initrd>,
    rsdp: u64,
) -> Result<u64, BootError> {
    let mut params = build_boot_params(header, spec, initrd)?;
    params.acpi_rsdp_addr = rsdp;
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&bp, mem)
        .map_err(|e| BootError::Params(e.to_string()))?;
    Ok(ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn test_boot_params_carry_cmdline_initrd_and_e820() {
        let kernel = crate::boot::KernelImage::File("k".into());
        let spec = BootSpec {
            kernel: &kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            mem_size: 256 << 20,
            vcpus: 2,
            pvm_quirks: false,
            tsc_khz: None,
            pci_mmio64: None,
        };
        let initrd = Initrd {
            addr: GuestAddress(0x0f00_0000),
            size: 0x10_0000,
        };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
        let at = write_boot_params(&mem, None, &spec, Some(initrd), 0xe_0000).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 14);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x0f00_0000, 0x10_0000)
        );
        let n = p.e820_entries as usize;
        assert_eq!(n, memory_map(256 << 20).len());
        let last_ram = p.e820_table[..n]
            .iter()
            .filter(|e| e.r#type == 1)
            .map(|e| e.addr + e.size)
            .max()
            .unwrap();
        assert_eq!(last_ram, 256 << 20);
    }
}
