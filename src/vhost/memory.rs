//! Guest memory of a vhost-user front end: the regions of SET_MEM_TABLE mapped from the file
//! descriptors that came with it, and the translation of the front end's own virtual
//! addresses (SET_VRING_ADDR carries those) to guest-physical addresses.

use std::fs::File;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::devices::virtio::GuestMemory;

/// Most regions one table may have (QEMU sends at most 8 with SET_MEM_TABLE).
pub const MAX_REGIONS: usize = 64;

/// One region as the front end describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Where the front end has the region mapped in its own address space.
    pub user_addr: u64,
    /// Offset of the region in its file.
    pub mmap_offset: u64,
}

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("The memory table has {regions} regions but {fds} file descriptors")]
    FdCount { regions: usize, fds: usize },
    #[error("The memory table has {0} regions (at most {MAX_REGIONS})")]
    TooManyRegions(usize),
    #[error("Memory region {index} is empty or wraps around")]
    BadRange { index: usize },
    #[error("Memory regions {a} and {b} overlap in guest-physical or front-end addresses")]
    Overlap { a: usize, b: usize },
    #[error("Cannot inspect the file of memory region {index}")]
    Stat {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("The file of memory region {index} is not a regular file (memfd, tmpfs or hugetlbfs)")]
    NotAFile { index: usize },
    #[error("Memory region {index} ends at byte {end} of its file, which has {len}")]
    PastEnd { index: usize, end: u64, len: u64 },
    #[error("Cannot map memory region {index}")]
    Map {
        index: usize,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("The memory regions do not form a valid guest memory map")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// The front end's guest memory, mapped into this process.
pub struct MemoryTable {
    mem: GuestMemory,
    regions: Vec<RegionSpec>,
    hugetlb: bool,
}

/// True when `file` lives on hugetlbfs (a memfd with MFD_HUGETLB, or a file in a hugetlbfs mount).
fn on_hugetlbfs(file: &File) -> bool {
    // SAFETY: statfs is plain data that fstatfs fills in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open fd for the duration of the call and `st` is a valid statfs.
    let r = unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(file), &mut st) };
    r == 0 && st.f_type == libc::HUGETLBFS_MAGIC
}

impl MemoryTable {
    /// Checks every region against its file (a region must lie inside its file, or touching
    /// it would raise SIGBUS) and maps them all shared.
    pub fn new(specs: &[RegionSpec], files: Vec<File>) -> Result<MemoryTable, MemoryError> {
        if specs.len() != files.len() {
            return Err(MemoryError::FdCount {
                regions: specs.len(),
                fds: files.len(),
            });
        }
        if specs.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions(specs.len()));
        }
        for (i, r) in specs.iter().enumerate() {
            let end_ok = r.guest_phys_addr.checked_add(r.size).is_some()
                && r.user_addr.checked_add(r.size).is_some()
                && r.mmap_offset.checked_add(r.size).is_some();
            if r.size == 0 || !end_ok || usize::try_from(r.size).is_err() {
                return Err(MemoryError::BadRange { index: i });
            }
            for (j, o) in specs[..i].iter().enumerate() {
                let over = |a: u64, b: u64| a < b + o.size && b < a + r.size;
                if over(r.guest_phys_addr, o.guest_phys_addr) || over(r.user_addr, o.user_addr) {
                    return Err(MemoryError::Overlap { a: j, b: i });
                }
            }
        }
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by_key(|&i| specs[i].guest_phys_addr);
        let mut files: Vec<Option<File>> = files.into_iter().map(Some).collect();
        let mut mapped = Vec::with_capacity(specs.len());
        let mut hugetlb = !specs.is_empty();
        for i in order {
            let r = specs[i];
            let file = files[i].take().expect("each file is taken once");
            let meta = file
                .metadata()
                .map_err(|source| MemoryError::Stat { index: i, source })?;
            let ft = meta.file_type();
            if !ft.is_file() {
                return Err(MemoryError::NotAFile { index: i });
            }
            hugetlb &= on_hugetlbfs(&file);
            let end = r.mmap_offset + r.size;
            if end > meta.len() {
                return Err(MemoryError::PastEnd {
                    index: i,
                    end,
                    len: meta.len(),
                });
            }
            let region =
                MmapRegion::<()>::from_file(FileOffset::new(file, r.mmap_offset), r.size as usize)
                    .map_err(|source| MemoryError::Map { index: i, source })?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.guest_phys_addr))
                .ok_or(MemoryError::BadRange { index: i })?;
            mapped.push(region);
        }
        let mem = GuestMemory::from_regions(mapped).map_err(MemoryError::Collection)?;
        Ok(MemoryTable {
            mem,
            regions: specs.to_vec(),
            hugetlb,
        })
    }

    /// The mapped guest memory (cheap to clone: the regions are shared).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The guest-physical address of the front end's virtual address `va`, if a region holds
    /// `len` bytes from there.
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = va.checked_sub(r.user_addr)?;
            (off.checked_add(len)? <= r.size).then(|| r.guest_phys_addr + off)
        })
    }

    /// True when every region lies on hugetlbfs.
    pub fn hugetlb(&self) -> bool {
        self.hugetlb
    }

    /// Total mapped bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    fn memfd(len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    fn spec(gpa: u64, size: u64, va: u64, off: u64) -> RegionSpec {
        RegionSpec {
            guest_phys_addr: gpa,
            size,
            user_addr: va,
            mmap_offset: off,
        }
    }

    #[test]
    fn test_two_regions_of_one_file_map_with_offsets_and_translate() {
        let mut f = memfd(0x3000);
        f.write_all(&[0u8; 0x2000]).unwrap();
        f.write_all(b"hi").unwrap();
        let g = f.try_clone().unwrap();
        let t = MemoryTable::new(
            &[
                spec(0x10_0000, 0x2000, 0x7000_0000, 0),
                spec(0, 0x1000, 0x7000_2000, 0x2000),
            ],
            vec![f, g],
        )
        .unwrap();
        let mut b = [0u8; 2];
        t.memory().read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(&b, b"hi");
        assert_eq!(t.va_to_gpa(0x7000_2000, 2), Some(0));
        assert_eq!(t.va_to_gpa(0x7000_1ff0, 16), Some(0x10_1ff0));
        assert_eq!(t.va_to_gpa(0x7000_1ff8, 16), None, "straddles two regions");
        assert_eq!(t.va_to_gpa(0x6fff_ffff, 1), None);
        assert_eq!(t.memory().num_regions(), 2);
        assert_eq!(t.size(), 0x3000);
    }

    #[test]
    fn test_region_past_end_of_file_is_refused() {
        let r = MemoryTable::new(&[spec(0, 0x2000, 0x1000, 0x1000)], vec![memfd(0x2000)]);
        assert!(
            matches!(r, Err(MemoryError::PastEnd { index: 0, .. })),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn test_fd_count_mismatch_is_refused() {
        let r = MemoryTable::new(&[spec(0, 0x1000, 0, 0)], vec![]);
        assert!(matches!(
            r,
            Err(MemoryError::FdCount { regions: 1, fds: 0 })
        ));
    }

    #[test]
    fn test_overlapping_or_wrapping_regions_are_refused() {
        let r = MemoryTable::new(
            &[spec(0, 0x2000, 0, 0), spec(0x1000, 0x1000, 0x10000, 0)],
            vec![memfd(0x2000), memfd(0x2000)],
        );
        assert!(matches!(r, Err(MemoryError::Overlap { a: 0, b: 1 })));
        let r = MemoryTable::new(&[spec(u64::MAX - 10, 0x1000, 0, 0)], vec![memfd(0x1000)]);
        assert!(matches!(r, Err(MemoryError::BadRange { index: 0 })));
        let r = MemoryTable::new(&[spec(0, 0, 0, 0)], vec![memfd(0x1000)]);
        assert!(matches!(r, Err(MemoryError::BadRange { index: 0 })));
    }

    #[test]
    fn test_region_backed_by_a_socket_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = File::from(std::os::fd::OwnedFd::from(a));
        let r = MemoryTable::new(&[spec(0, 0x1000, 0, 0)], vec![f]);
        assert!(matches!(r, Err(MemoryError::NotAFile { index: 0 })));
    }
}
