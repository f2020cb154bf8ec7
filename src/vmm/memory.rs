//! Guest memory: anonymous 4K, transparent hugepages or hugetlb 2M/1G, optionally
//! prefaulted, laid out around the 32-bit MMIO hole.

use std::fs;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::layout::{HIGH_RAM_START, MMIO_HOLE_START};
use crate::devices::virtio::GuestMemory;

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Plain anonymous memory with 4 KiB pages.
    None,
    /// Anonymous memory with `madvise(MADV_HUGEPAGE)`: 2 MiB pages when the kernel has them.
    #[default]
    Thp,
    /// hugetlb pages of 2 MiB (reserved in advance).
    Huge2M,
    /// hugetlb pages of 1 GiB (reserved in advance).
    Huge1G,
}

impl HugePages {
    /// Page size in bytes that memory must be a multiple of.
    pub fn page_size(self) -> u64 {
        match self {
            HugePages::None | HugePages::Thp => 4096,
            HugePages::Huge2M => 2 << 20,
            HugePages::Huge1G => 1 << 30,
        }
    }

    fn sysfs_dir(self) -> Option<&'static str> {
        match self {
            HugePages::Huge2M => Some("/sys/kernel/mm/hugepages/hugepages-2048kB"),
            HugePages::Huge1G => Some("/sys/kernel/mm/hugepages/hugepages-1048576kB"),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            HugePages::None => "none",
            HugePages::Thp => "thp",
            HugePages::Huge2M => "2M",
            HugePages::Huge1G => "1G",
        }
    }
}

impl std::str::FromStr for HugePages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "off" | "4k" => Ok(HugePages::None),
            "thp" => Ok(HugePages::Thp),
            "2m" => Ok(HugePages::Huge2M),
            "1g" => Ok(HugePages::Huge1G),
            _ => Err(format!(
                "unknown hugepage mode '{s}' (expected none, thp, 2M or 1G)"
            )),
        }
    }
}

/// Errors from creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Guest memory size {size} is not a multiple of the {page}-byte page size")]
    Unaligned { size: u64, page: u64 },
    #[error("Guest memory size {0} is too small (at least 16 MiB)")]
    TooSmall(u64),
    #[error(
        "{mode} hugepages requested for {needed} pages but only {free} are free; reserve them with \
         `scripts/setup-hugepages.sh {needed_total}` (or echo N > {dir}/nr_hugepages)"
    )]
    NotEnoughHugePages {
        mode: &'static str,
        needed: u64,
        free: u64,
        needed_total: u64,
        dir: &'static str,
    },
    #[error("{mode} hugepages are not supported by this kernel ({dir} is missing)")]
    HugePagesUnsupported {
        mode: &'static str,
        dir: &'static str,
    },
    #[error("Failed to map {size} bytes of guest memory")]
    Mmap {
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("Failed to build the guest memory map")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("Failed to prefault guest memory")]
    Prefault(#[source] std::io::Error),
    #[error(
        "Cannot offer guest memory to KSM (madvise MADV_MERGEABLE) for --memory-merge; \
         is KSM built into this kernel ({KSM_DIR} is {})?",
        if std::path::Path::new(KSM_DIR).exists() { "there" } else { "missing" }
    )]
    Merge(#[source] std::io::Error),
}

/// The RAM ranges of a guest with `size` bytes of memory: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(HIGH_RAM_START), size - low));
    }
    ranges
}

fn read_sysfs_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn check_hugepages(mode: HugePages, size: u64) -> Result<(), MemoryError> {
    let Some(dir) = mode.sysfs_dir() else {
        return Ok(());
    };
    let free = read_sysfs_u64(&format!("{dir}/free_hugepages")).ok_or(
        MemoryError::HugePagesUnsupported {
            mode: mode.label(),
            dir,
        },
    )?;
    let needed = size / mode.page_size();
    if free < needed {
        let total = read_sysfs_u64(&format!("{dir}/nr_hugepages")).unwrap_or(0);
        return Err(MemoryError::NotEnoughHugePages {
            mode: mode.label(),
            needed,
            free,
            needed_total: total + (needed - free),
            dir,
        });
    }
    Ok(())
}

/// The kernel's same-page merging controls and counters.
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// Creates guest memory of `size` bytes backed as `mode` asks; with `prefault` every page is
/// populated before this returns, so the guest never takes a first-touch fault. With `merge`
/// the RAM is offered to KSM (MADV_MERGEABLE): identical pages, across VMs too, may then
/// share one copy-on-write frame.
pub fn create(
    size: u64,
    mode: HugePages,
    prefault: bool,
    merge: bool,
) -> Result<GuestMemory, MemoryError> {
    if size < (16 << 20) {
        return Err(MemoryError::TooSmall(size));
    }
    let page = mode.page_size();
    if size % page != 0 {
        return Err(MemoryError::Unaligned { size, page });
    }
    check_hugepages(mode, size)?;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    match mode {
        HugePages::None | HugePages::Thp => flags |= libc::MAP_NORESERVE,
        HugePages::Huge2M => flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
        HugePages::Huge1G => flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_1GB,
    }
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(size) {
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(matches!(mode, HugePages::Huge2M | HugePages::Huge1G))
            .build()
            .map_err(|source| MemoryError::Mmap { size: len, source })?;
        let ptr = mapping.as_ptr();
        if merge {
            merge_pages(ptr, len as usize)?;
        }
        advise(ptr, len as usize, mode, prefault)?;
        let region = GuestRegionMmap::new(mapping, base)
            .expect("RAM ranges never overflow the address space");
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Regions)
}

fn advise(ptr: *mut u8, len: usize, mode: HugePages, prefault: bool) -> Result<(), MemoryError> {
    if mode == HugePages::Thp {
        // SAFETY: ptr/len describe a mapping this process just created and owns.
        let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            log::warn!(
                "madvise(MADV_HUGEPAGE) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if prefault {
        // SAFETY: as above; MADV_POPULATE_WRITE only faults pages in, it never changes contents.
        let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(MemoryError::Prefault(err));
            }
            // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch one byte per page.
            let step = mode.page_size() as usize;
            for off in (0..len).step_by(step) {
                // SAFETY: off < len, inside the mapping; a volatile write of the value already
                // there (zero in a fresh mapping) keeps contents and forces the fault now.
                unsafe { std::ptr::write_volatile(ptr.add(off), 0) };
            }
        }
    }
    Ok(())
}

/// Marks the mapping mergeable (before prefaulting, so KSM sees every page from its first
/// scan). Warns when KSM is not running: then nothing merges until /sys/kernel/mm/ksm/run is 1.
fn merge_pages(ptr: *mut u8, len: usize) -> Result<(), MemoryError> {
    // SAFETY: ptr/len describe a mapping this process just created and owns; MADV_MERGEABLE
    // changes how the kernel may back the pages, never their contents.
    if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_MERGEABLE) } != 0 {
        return Err(MemoryError::Merge(std::io::Error::last_os_error()));
    }
    if read_sysfs_u64(&format!("{KSM_DIR}/run")) != Some(1) {
        log::warn!(
            "--memory-merge: KSM is not running ({KSM_DIR}/run is not 1), so no page merges \
             until it is (echo 1 > {KSM_DIR}/run)"
        );
    }
    Ok(())
}

/// Total bytes of all regions.
pub fn total_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ram_ranges_small_guest_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn test_ram_ranges_large_guest_splits_around_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(HIGH_RAM_START), 1 << 30)
            ]
        );
    }

    #[test]
    fn test_create_unaligned_size_is_rejected() {
        let err = create((32 << 20) + 4096, HugePages::Huge2M, false, false).unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
    }

    #[test]
    fn test_create_anonymous_memory_reads_zero() {
        use vm_memory::Bytes;
        let mem = create(32 << 20, HugePages::None, true, false).unwrap();
        assert_eq!(total_size(&mem), 32 << 20);
        let v: u64 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(v, 0);
    }

    /// The VmFlags of the mapping that starts at `addr` (/proc/self/smaps).
    fn vm_flags(addr: usize) -> String {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "no mapping at {addr:#x}");
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("VmFlags line")
            .to_string()
    }

    #[test]
    fn test_create_with_merge_marks_ram_mergeable_and_without_does_not() {
        for merge in [true, false] {
            let mem = create(32 << 20, HugePages::None, false, merge).unwrap();
            let addr = mem.iter().next().unwrap().as_ptr() as usize;
            let flags = vm_flags(addr);
            // "mg": VM_MERGEABLE, what MADV_MERGEABLE sets and KSM scans.
            let mg = flags.split_whitespace().any(|f| f == "mg");
            assert_eq!(mg, merge, "merge={merge}: VmFlags{flags}");
        }
    }

    #[test]
    fn test_hugepages_mode_parse_rejects_unknown() {
        assert!("3M".parse::<HugePages>().is_err());
        assert_eq!("2m".parse::<HugePages>().unwrap(), HugePages::Huge2M);
    }
}
