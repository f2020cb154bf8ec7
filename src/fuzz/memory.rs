//! Guest memory of the queue harnesses, reset from each input and checked after the device
//! ran, at a cost that does not grow with the harness's own instrumented loops.
//!
//! libFuzzer instruments every comparison of every loop (`trace-compares`), so a byte loop
//! over guest memory costs a call per byte. Here the per-input work is bulk: the image is
//! copied in with one `memcpy` per region and only the part of memory that may be dirty is
//! zeroed; the writes check merges the allowed ranges once (a handful of descriptors) and
//! compares every byte outside them, all of guest memory, with `memcmp` in a few calls per
//! gap. Only a failing input is walked byte by byte, to name the first bad byte.
//!
//! The dirty mark: after a check that passed, memory differs from the (zero-padded) image
//! only inside the allowed ranges, so everything past the image and past the last allowed
//! range is known to be zero and the next input need not zero it again. When the check did
//! not run (or was skipped, or panicked), all memory past the image counts as dirty.

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _, MemoryRegionAddress,
};

use super::{guest_memory, MEM_SIZE};
use crate::devices::virtio::block::driver::{TestDriver, F_INDIRECT, F_WRITE};
use crate::devices::virtio::GuestMemory;

/// Zeroes to compare memory past the image against.
static ZERO: [u8; 4096] = [0; 4096];

/// Longest used ring a harness clears (16 entries).
const USED_MAX: usize = 6 + 8 * 16;

/// One guest memory region: its guest start, host address and length.
#[derive(Clone, Copy)]
struct Region {
    start: usize,
    host: *mut u8,
    len: usize,
}

/// Guest memory with what a queue harness needs to load an input and check the device.
pub struct GuestImage {
    mem: GuestMemory,
    regions: Vec<Region>,
    /// Memory from this offset on is zero (as far as the harness knows).
    clean_from: usize,
    /// Where the device may write: `[0]` the used ring, then every device-writable buffer.
    allowed: Vec<(u64, u64)>,
    /// `allowed`, sorted and merged.
    merged: Vec<(u64, u64)>,
    /// The descriptor tables of the queue (direct and indirect), for the skip rule.
    tables: Vec<(u64, u64)>,
}

impl GuestImage {
    /// The harness memory ([`guest_memory`]), all zero.
    pub fn new() -> Self {
        let mem = guest_memory();
        let regions = mem
            .iter()
            .map(|r| Region {
                start: r.start_addr().0 as usize,
                host: r
                    .get_host_address(MemoryRegionAddress(0))
                    .expect("mapped region"),
                len: r.len() as usize,
            })
            .collect();
        GuestImage {
            mem,
            regions,
            clean_from: 0,
            allowed: Vec::with_capacity(64),
            merged: Vec::with_capacity(64),
            tables: Vec::with_capacity(32),
        }
    }

    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Writes `image` from address 0 and zeroes the rest of guest memory (what may be
    /// dirty of it), then clears the used ring of `drv`'s queue: it belongs to the device,
    /// so the index the device publishes is its own count.
    pub fn load(&mut self, image: &[u8], drv: &TestDriver) {
        let n = image.len().min(MEM_SIZE);
        let dirty_end = self.clean_from.max(n);
        for r in &self.regions {
            let end = r.start + r.len;
            if r.start < n {
                let k = n.min(end) - r.start;
                // SAFETY: `r.host` maps `r.len` bytes of guest memory for the life of
                // `self.mem`; `k <= r.len` and `image[r.start..r.start + k]` exists (`n <=
                // image.len()`); host memory of the guest cannot overlap the input.
                unsafe { std::ptr::copy_nonoverlapping(image[r.start..].as_ptr(), r.host, k) };
            }
            let (zs, ze) = (n.max(r.start), dirty_end.min(end));
            if zs < ze {
                // SAFETY: `zs - r.start + (ze - zs) <= r.len`: inside the mapped region.
                unsafe { std::ptr::write_bytes(r.host.add(zs - r.start), 0, ze - zs) };
            }
        }
        // Until a check proves otherwise, the device may write anywhere.
        self.clean_from = MEM_SIZE;
        let used_len = 6 + 8 * usize::from(drv.size);
        self.mem
            .write_slice(&[0u8; USED_MAX][..used_len.min(USED_MAX)], drv.used)
            .expect("the used ring lies inside guest memory");
    }

    /// Records where the device may write for `drv`'s queue, read from `image` (the memory
    /// the device saw before it ran): every device-writable descriptor, directly in the table
    /// or in an indirect table one level down, plus the used ring.
    pub fn allow_writable(&mut self, image: &[u8], drv: &TestDriver) {
        let (desc, size) = (drv.desc.0, drv.size);
        let out = &mut self.allowed;
        out.clear();
        out.push((drv.used.0, drv.used.0 + 6 + 8 * u64::from(size)));
        for i in 0..u64::from(size) {
            let (addr, len, flags) = desc_at(image, desc + 16 * i);
            if flags & F_INDIRECT != 0 {
                // Past the image, guest memory is zero: no flags, nothing writable.
                for j in 0..(u64::from(len) / 16).min(MEM_SIZE as u64 / 16) {
                    let at = addr.wrapping_add(16 * j);
                    if at >= image.len() as u64 {
                        break;
                    }
                    let (a, l, fl) = desc_at(image, at);
                    if fl & F_WRITE != 0 {
                        out.push((a, a.saturating_add(u64::from(l))));
                    }
                }
            } else if flags & F_WRITE != 0 {
                out.push((addr, addr.saturating_add(u64::from(len))));
            }
        }
    }

    /// Panics if guest memory differs from `image` (zero-padded) anywhere outside the
    /// ranges of [`Self::allow_writable`]: the device wrote where the driver gave it no
    /// writable buffer. Every byte of guest memory is compared. A guest may point a writable
    /// buffer at its own descriptors, and then the chains the device walks after such a
    /// write are not the image's; the check is skipped for such inputs (the generated chains
    /// never do this, so the stable tests always check).
    pub fn assert_writes_within(&mut self, image: &[u8], drv: &TestDriver) {
        self.find_tables(image, drv.desc.0, drv.size);
        let tables = &self.tables;
        if self.allowed[1..]
            .iter()
            .any(|&(s, e)| tables.iter().any(|&(ts, te)| s < te && ts < e))
        {
            return;
        }
        self.merge_allowed();
        if let Some((a, b)) = self.writes_outside(image) {
            panic!(
                "device wrote {b:#x} at guest address {a:#x} outside every device-writable buffer"
            );
        }
        // Outside the allowed ranges memory is the padded image: past both, it is zero.
        let n = image.len().min(MEM_SIZE);
        let last = self.merged.last().map_or(0, |&(_, e)| e);
        self.clean_from = n.max(last as usize);
    }

    /// The descriptor table and every indirect table it names, as read from `image`.
    fn find_tables(&mut self, image: &[u8], desc: u64, size: u16) {
        self.tables.clear();
        self.tables.push((desc, desc + 16 * u64::from(size)));
        for i in 0..u64::from(size) {
            let (addr, len, flags) = desc_at(image, desc + 16 * i);
            if flags & F_INDIRECT != 0 {
                self.tables
                    .push((addr, addr.saturating_add(u64::from(len))));
            }
        }
    }

    /// `allowed` inside guest memory (cut at its end), sorted by start, overlapping and
    /// touching ranges joined, empty ones dropped.
    fn merge_allowed(&mut self) {
        self.merged.clear();
        // Indirect tables list many descriptors, often repeated or in address order: join
        // each range with the previous one where they meet, so that little is left to sort.
        for &(s, e) in &self.allowed {
            let e = e.min(MEM_SIZE as u64);
            match self.merged.last_mut() {
                _ if s >= e => {}
                Some(last) if s <= last.1 && last.0 <= e => *last = (last.0.min(s), last.1.max(e)),
                _ => self.merged.push((s, e)),
            }
        }
        self.merged.sort_unstable_by_key(|r| r.0);
        let mut w = 0;
        for r in 0..self.merged.len() {
            let (s, e) = self.merged[r];
            if w > 0 && s <= self.merged[w - 1].1 {
                let prev = &mut self.merged[w - 1];
                prev.1 = prev.1.max(e);
            } else {
                self.merged[w] = (s, e);
                w += 1;
            }
        }
        self.merged.truncate(w);
    }

    /// The first byte outside the merged ranges that differs from the padded image:
    /// (address, new value).
    fn writes_outside(&self, image: &[u8]) -> Option<(u64, u8)> {
        // The merged ranges are sorted, disjoint and inside memory: compare the gaps.
        let mut at = 0;
        for &(s, e) in &self.merged {
            if let Some(bad) = self.first_change(image, at, s) {
                return Some(bad);
            }
            at = e;
        }
        self.first_change(image, at, MEM_SIZE as u64)
    }

    /// The first byte of `[from, to)` that differs from the padded image, if any.
    fn first_change(&self, image: &[u8], from: u64, to: u64) -> Option<(u64, u8)> {
        let (from, to) = (from as usize, to as usize);
        let n = image.len().min(MEM_SIZE);
        for r in &self.regions {
            let (s, e) = (from.max(r.start), to.min(r.start + r.len));
            if s >= e {
                continue;
            }
            // SAFETY: `[s, e)` lies inside the region, mapped for the life of `self.mem`;
            // the harness thread is the only one touching guest memory while it checks.
            let bytes = unsafe { std::slice::from_raw_parts(r.host.add(s - r.start), e - s) };
            // Below `n` the image, past it zeros.
            let k = n.saturating_sub(s).min(e - s);
            let same = (k == 0 || bytes[..k] == image[s..s + k])
                && bytes[k..].chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()]);
            if !same {
                // A failing input only: walk it to name the byte.
                let before = |at: usize| image.get(at).copied().unwrap_or(0);
                let i = (0..bytes.len())
                    .find(|&i| bytes[i] != before(s + i))
                    .expect("a byte differs");
                return Some(((s + i) as u64, bytes[i]));
            }
        }
        None
    }

    /// With the allowed ranges of [`Self::allow_writable`]: when no device-writable buffer
    /// overlaps the rings (`[desc, used_end)`), the used ring can be trusted, so check it:
    /// the used index is the handler's count, and every used entry names a head the driver
    /// made available, no more often than it did.
    pub fn check_used_ring(&self, image: &[u8], drv: &TestDriver, used: u16, popped: u16) {
        let (desc, avail, used_at, size) = (drv.desc.0, drv.avail.0, drv.used.0, drv.size);
        let rings_end = used_at + 6 + 8 * u64::from(size);
        if self.allowed[1..]
            .iter()
            .any(|&(s, e)| s < rings_end && desc < e)
        {
            return;
        }
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(used_at + 2))
            .expect("used ring");
        assert_eq!(idx, used, "the used index is what the handler wrote");
        if used > size || popped > size {
            // Entries wrapped around the rings: the image no longer shows them all.
            return;
        }
        let byte = |a: u64| u16::from(image.get(a as usize).copied().unwrap_or(0));
        let mut offered = [0u16; 16];
        let mut left = usize::from(popped);
        for (i, h) in offered[..left].iter_mut().enumerate() {
            let at = avail + 4 + 2 * i as u64;
            *h = byte(at) | byte(at + 1) << 8;
        }
        for i in 0..used {
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(used_at + 4 + 8 * u64::from(i)))
                .expect("used ring");
            let Some(k) = offered[..left].iter().position(|&h| u32::from(h) == id) else {
                panic!("used entry {i} names head {id}, which the driver did not make available");
            };
            left -= 1;
            offered.swap(k, left);
        }
    }
}

impl Default for GuestImage {
    fn default() -> Self {
        Self::new()
    }
}

/// Descriptor at guest address `at` as read from `image` (zero past its end): address,
/// length, flags.
fn desc_at(image: &[u8], at: u64) -> (u64, u32, u16) {
    let mut d = [0u8; 16];
    if let Some(tail) = usize::try_from(at).ok().and_then(|a| image.get(a..)) {
        let k = tail.len().min(16);
        d[..k].copy_from_slice(&tail[..k]);
    }
    let u64_at = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().expect("4 bytes"));
    (u64_at(0), u32_at(8), u16::from_le_bytes([d[12], d[13]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::driver::Buf;

    /// A queue of 4 with one chain: a readable buffer at 0x1000 and a writable one at 0x5000.
    fn case() -> (GuestImage, TestDriver, Vec<u8>) {
        let img = GuestImage::new();
        let mut d = TestDriver::new(img.mem(), GuestAddress(0), 4, MEM_SIZE as u64);
        d.write_chain(&[
            Buf::r(GuestAddress(0x1000), 16),
            Buf::w(GuestAddress(0x5000), 512),
        ]);
        d.publish(0);
        let mut image = vec![0u8; 0x2000];
        img.mem()
            .read_slice(&mut image, GuestAddress(0))
            .expect("inside guest memory");
        (img, d, image)
    }

    fn poke(img: &GuestImage, at: u64, b: u8) {
        img.mem()
            .write_obj(b, GuestAddress(at))
            .expect("inside guest memory");
    }

    fn all_zero_from(img: &GuestImage, from: usize) -> bool {
        let mut rest = vec![0u8; MEM_SIZE - from];
        img.mem()
            .read_slice(&mut rest, GuestAddress(from as u64))
            .expect("inside guest memory");
        rest.iter().all(|&b| b == 0)
    }

    #[test]
    fn test_writes_inside_writable_buffer_and_used_ring_pass() {
        let (mut img, d, image) = case();
        img.load(&image, &d);
        img.allow_writable(&image, &d);
        poke(&img, 0x5000, 7);
        poke(&img, 0x51ff, 7);
        poke(&img, d.used.0 + 2, 1);
        img.assert_writes_within(&image, &d);
    }

    #[test]
    #[should_panic(expected = "at guest address 0x5200 outside")]
    fn test_write_one_past_writable_buffer_panics() {
        let (mut img, d, image) = case();
        img.load(&image, &d);
        img.allow_writable(&image, &d);
        poke(&img, 0x5200, 1);
        img.assert_writes_within(&image, &d);
    }

    #[test]
    #[should_panic(expected = "at guest address 0x1004 outside")]
    fn test_write_into_readable_buffer_panics() {
        let (mut img, d, image) = case();
        img.load(&image, &d);
        img.allow_writable(&image, &d);
        poke(&img, 0x1004, 1);
        img.assert_writes_within(&image, &d);
    }

    #[test]
    #[should_panic(expected = "0x7fff outside")]
    fn test_write_at_end_of_memory_far_from_any_buffer_panics() {
        let (mut img, d, image) = case();
        img.load(&image, &d);
        img.allow_writable(&image, &d);
        poke(&img, MEM_SIZE as u64 - 1, 1);
        img.assert_writes_within(&image, &d);
    }

    #[test]
    fn test_load_after_checked_writes_past_image_zeroes_them() {
        let (mut img, d, image) = case();
        img.load(&image, &d);
        img.allow_writable(&image, &d);
        poke(&img, 0x51ff, 9);
        img.assert_writes_within(&image, &d);
        assert_eq!(img.clean_from, 0x5200, "zero past the writable buffer");
        img.load(&image[..0x100], &d);
        assert!(all_zero_from(&img, 0x100));
    }

    #[test]
    fn test_load_after_unchecked_run_zeroes_all_memory_past_image() {
        let (mut img, d, image) = case();
        img.load(&image, &d);
        // No check ran: a stray write anywhere must not survive into the next input.
        poke(&img, MEM_SIZE as u64 - 1, 9);
        img.load(&image[..0x100], &d);
        assert!(all_zero_from(&img, 0x100));
    }

    #[test]
    fn test_load_clears_used_ring_of_image() {
        let (mut img, d, mut image) = case();
        let at = d.used.0 as usize + 2;
        image[at] = 0x55;
        img.load(&image, &d);
        let idx: u16 = img.mem().read_obj(GuestAddress(d.used.0 + 2)).unwrap();
        assert_eq!(idx, 0);
    }

    #[test]
    fn test_merge_allowed_joins_overlaps_and_drops_empty_ranges() {
        let mut img = GuestImage::new();
        img.allowed = vec![(50, 60), (10, 20), (15, 30), (30, 40), (70, 70), (0, 5)];
        img.merge_allowed();
        assert_eq!(img.merged, vec![(0, 5), (10, 40), (50, 60)]);
        // Joined out of order too: a range that covers the previous one, one that starts
        // before it, and repeats.
        img.allowed = vec![
            (100, 110),
            (90, 120),
            (80, 95),
            (80, 95),
            (5, 6),
            (0, 5),
            (7, 8),
        ];
        img.merge_allowed();
        assert_eq!(img.merged, vec![(0, 6), (7, 8), (80, 120)]);
        // Past guest memory nothing is compared: such ranges are cut or dropped.
        let end = MEM_SIZE as u64;
        img.allowed = vec![
            (end + 8, end + 16),
            (end - 4, u64::MAX),
            (0, 1),
            (end, end + 1),
        ];
        img.merge_allowed();
        assert_eq!(img.merged, vec![(0, 1), (end - 4, end)]);
    }

    #[test]
    fn test_desc_at_past_image_reads_zero() {
        let mut image = vec![0u8; 20];
        image[16..20].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        assert_eq!(desc_at(&image, 16), (0xdead_beef, 0, 0));
        assert_eq!(desc_at(&image, 32), (0, 0, 0));
        assert_eq!(desc_at(&image, u64::MAX - 3), (0, 0, 0));
    }
}
