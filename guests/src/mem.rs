//! The libc memory functions the linux-gnu target expects, and a bump
//! allocator over the RAM the PVH memory map describes.
//!
//! The mem* functions use `rep movsb/stosb` in inline asm so the compiler
//! cannot lower them back into calls to themselves.

use core::arch::asm;

/// # Safety
/// `dst` and `src` are valid for `n` bytes and do not overlap.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear (boot code and SysV ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `dst` and `src` are valid for `n` bytes; they may overlap.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: forward copy is safe when dst is not inside (src, src + n).
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards with DF set, restoring DF after.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dst
}

/// # Safety
/// `dst` is valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller's contract. Volatile keeps the loop a loop.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As for `memcmp`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}

/// Zeroes `n` bytes at physical address `addr` (native speed in ring 3).
pub fn zero(addr: u64, n: usize) {
    // SAFETY: callers pass memory they allocated from the bump allocator.
    unsafe { memset(addr as *mut u8, 0, n) };
}

/// Bump allocator over one RAM range; memory is handed out zeroed.
pub struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    pub const fn new(start: u64, end: u64) -> Self {
        Bump { next: start, end }
    }

    /// Allocates `size` zeroed bytes aligned to `align` (a power of two), or `None`.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        zero(start, size as usize);
        Some(start)
    }

    /// Bytes still free.
    pub fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.next)
    }
}

/// Arena used when the VMM passes no memory map (start-info version 0).
const FALLBACK_ARENA: u64 = 16 << 20;

/// A bump allocator over the largest RAM range above the image (and above the start-info
/// data), below 4 GiB; 16 MiB after the image when the VMM passed no memory map.
#[cfg(not(test))]
pub fn arena(si: &crate::start_info::StartInfo) -> Bump {
    extern "C" {
        static __image_end: u8;
    }
    let image_end = &raw const __image_end as u64;
    let mut best = (0, 0);
    for r in si.ram() {
        let mut lo = r.addr.max(image_end);
        if si.max_addr > lo && si.max_addr <= r.addr + r.size {
            lo = si.max_addr;
        }
        lo = (lo + 4095) & !4095;
        let hi = (r.addr + r.size).min(1 << 32);
        if hi > lo && hi - lo > best.1 - best.0 {
            best = (lo, hi);
        }
    }
    if best.1 == 0 {
        let lo = (image_end + 4095) & !4095;
        best = (lo, lo + FALLBACK_ARENA);
    }
    Bump::new(best.0, best.1)
}


/// A page-table page (any level).
#[repr(C, align(4096))]
pub struct Table(pub [u64; 512]);

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_PS: u64 = 1 << 7;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const PAGE_2M: u64 = 1 << 21;
/// Identity mapping ends where virtual addresses stop being canonical (4-level paging).
const IDENTITY_LIMIT: u64 = 1 << 47;

/// Why an MMIO range could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The range ends beyond the CPU's physical address width (or beyond 2^47, where an
    /// identity map stops being canonical).
    BeyondPhysical { end: u64, bits: u32 },
    /// The page-table pool is used up.
    NoTables,
}

/// Maps `[addr, addr + size)` 1:1 for ring 3 with uncached 2 MiB pages in the 4-level
/// tables at `pml4`, taking new tables from `alloc` (zeroed pages). Entries already
/// present (the boot map of 0–4 GiB, an earlier BAR) are kept.
///
/// # Safety
/// `pml4` and every table it reaches are identity-mapped, writable page tables in use or
/// about to be used by this CPU, and `alloc` returns zeroed, unused, identity-mapped pages.
pub unsafe fn map_uncached(
    pml4: *mut Table,
    addr: u64,
    size: u64,
    phys_bits: u32,
    alloc: &mut dyn FnMut() -> Option<*mut Table>,
) -> Result<(), MapError> {
    let end = addr.saturating_add(size);
    if end > IDENTITY_LIMIT.min(1u64 << phys_bits.min(63)) {
        return Err(MapError::BeyondPhysical { end, bits: phys_bits });
    }
    let mut chunk = addr & !(PAGE_2M - 1);
    while chunk < end {
        let mut table = pml4;
        for shift in [39u32, 30] {
            let idx = ((chunk >> shift) & 511) as usize;
            // SAFETY: `table` is a live page table (the caller's contract), idx < 512.
            let entry_ptr = unsafe { &raw mut (*table).0[idx] };
            // SAFETY: as above.
            let entry = unsafe { core::ptr::read_volatile(entry_ptr) };
            if entry & PTE_PRESENT == 0 {
                let next = alloc().ok_or(MapError::NoTables)?;
                // SAFETY: as above; the new table is zeroed (no entry present yet).
                unsafe { core::ptr::write_volatile(entry_ptr, next as u64 | PTE_PRESENT | PTE_WRITABLE | PTE_USER) };
                table = next;
            } else if shift == 30 && entry & PTE_PS != 0 {
                // A 1 GiB page already maps this gigabyte.
                table = core::ptr::null_mut();
                break;
            } else {
                table = (entry & PTE_ADDR) as *mut Table;
            }
        }
        if !table.is_null() {
            let idx = ((chunk >> 21) & 511) as usize;
            // SAFETY: a live page directory, idx < 512.
            let entry_ptr = unsafe { &raw mut (*table).0[idx] };
            // SAFETY: as above.
            if unsafe { core::ptr::read_volatile(entry_ptr) } & PTE_PRESENT == 0 {
                let pte = chunk | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_PWT | PTE_PCD | PTE_PS;
                // SAFETY: as above. Not present before, so no TLB entry needs flushing.
                unsafe { core::ptr::write_volatile(entry_ptr, pte) };
            }
        }
        chunk += PAGE_2M;
    }
    Ok(())
}

/// Tables for BARs mapped after boot: a BAR of up to 1 GiB needs at most a page-directory
/// pointer table and two page directories, so this covers a few devices.
#[cfg(not(test))]
const POOL_TABLES: usize = 8;
#[cfg(not(test))]
static mut POOL: [Table; POOL_TABLES] = [const { Table([0; 512]) }; POOL_TABLES];
#[cfg(not(test))]
static mut POOL_USED: usize = 0;

/// The CPU's physical address width (CPUID 0x80000008), 36 where it is not reported.
pub fn phys_bits() -> u32 {
    if crate::arch::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        crate::arch::cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    }
}

/// Maps an MMIO range (a BAR above 4 GiB) uncached into the running page tables, so ring 3
/// reaches it wherever the VMM or the driver put it. The tables are ring-3 writable data
/// (`boot_pml4` in boot.rs); an entry that goes from not present to present needs no TLB
/// flush, and CPUID (serializing) orders the table writes before the first access.
#[cfg(not(test))]
pub fn map_mmio(addr: u64, size: u64) -> Result<(), MapError> {
    extern "C" {
        static mut boot_pml4: Table;
    }
    let mut alloc = || {
        // SAFETY: single-threaded guest; POOL is used only here and was zeroed with .bss.
        unsafe {
            let used = POOL_USED;
            if used == POOL_TABLES {
                return None;
            }
            POOL_USED = used + 1;
            Some(&raw mut POOL[used])
        }
    };
    // SAFETY: boot_pml4 is the live PML4 (CR3), identity mapped and ring-3 writable like
    // every table it reaches; the pool's pages are zeroed and unused.
    let r = unsafe { map_uncached(&raw mut boot_pml4, addr, size, phys_bits(), &mut alloc) };
    crate::arch::cpuid(0, 0);
    r
}

/// Host unit tests have no guest page tables to extend.
#[cfg(test)]
pub fn map_mmio(_addr: u64, _size: u64) -> Result<(), MapError> {
    Err(MapError::NoTables)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page tables on the host heap; "physical" addresses are the pointers.
    struct Tables(Vec<Box<Table>>);

    impl Tables {
        fn alloc(&mut self) -> Option<*mut Table> {
            if self.0.len() >= 6 {
                return None;
            }
            self.0.push(Box::new(Table([0; 512])));
            self.0.last_mut().map(|t| &raw mut **t)
        }
    }

    /// Walks the tables for `va`: the final 2 MiB entry, if mapped.
    fn walk(pml4: &Table, va: u64) -> Option<u64> {
        let mut t = pml4 as *const Table;
        for shift in [39u32, 30, 21] {
            // SAFETY: the test's own live tables.
            let e = unsafe { (*t).0[((va >> shift) & 511) as usize] };
            if e & PTE_PRESENT == 0 {
                return None;
            }
            if shift == 21 || e & PTE_PS != 0 {
                return Some(e);
            }
            t = (e & PTE_ADDR) as *const Table;
        }
        None
    }

    #[test]
    fn test_map_uncached_bar_at_256g_gets_uncached_user_2m_page() {
        let mut pml4 = Box::new(Table([0; 512]));
        let mut tables = Tables(Vec::new());
        let bar = 0x40_0000_0000u64;
        // SAFETY: host-heap tables the test owns.
        unsafe { map_uncached(&raw mut *pml4, bar, 0x8000, 48, &mut || tables.alloc()) }.unwrap();
        let e = walk(&pml4, bar + 0x7000).expect("the BAR's last page is mapped");
        assert_eq!(e & PTE_ADDR, bar, "identity");
        let want = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_PWT | PTE_PCD | PTE_PS;
        assert_eq!(e & 0xfff, want);
        assert_eq!(tables.0.len(), 2, "one PDPT and one PD");
        assert_eq!(walk(&pml4, bar + PAGE_2M), None, "nothing beyond the BAR");
    }

    #[test]
    fn test_map_uncached_spanning_a_gigabyte_boundary_and_reusing_tables() {
        let mut pml4 = Box::new(Table([0; 512]));
        let mut tables = Tables(Vec::new());
        let start = 0x1_3fe0_0000u64; // the last 2 MiB of a gigabyte
        // SAFETY: host-heap tables the test owns.
        unsafe { map_uncached(&raw mut *pml4, start, 4 << 20, 48, &mut || tables.alloc()) }.unwrap();
        assert!(walk(&pml4, start).is_some() && walk(&pml4, start + PAGE_2M).is_some());
        assert_eq!(tables.0.len(), 3, "one PDPT, a PD per gigabyte");
        // A second BAR in the same 2 MiB page changes nothing and takes no table.
        // SAFETY: as above.
        unsafe { map_uncached(&raw mut *pml4, start + 0x8000, 0x8000, 48, &mut || tables.alloc()) }.unwrap();
        assert_eq!(tables.0.len(), 3);
    }

    #[test]
    fn test_map_uncached_beyond_phys_bits_or_out_of_tables_is_an_error() {
        let mut pml4 = Box::new(Table([0; 512]));
        let mut tables = Tables(Vec::new());
        // SAFETY: host-heap tables the test owns.
        let r = unsafe { map_uncached(&raw mut *pml4, 1 << 40, 0x8000, 40, &mut || tables.alloc()) };
        assert_eq!(r, Err(MapError::BeyondPhysical { end: (1 << 40) + 0x8000, bits: 40 }));
        assert!(tables.0.is_empty(), "nothing touched");
        // Four gigabytes in four different 512 GiB regions need 8 tables; the test has 6.
        let mut r = Ok(());
        for i in 1..5u64 {
            // SAFETY: as above.
            r = r.and(unsafe { map_uncached(&raw mut *pml4, i << 39, 0x8000, 48, &mut || tables.alloc()) });
        }
        assert_eq!(r, Err(MapError::NoTables));
    }
}
