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

