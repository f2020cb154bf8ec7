//! The virtio-blk request parser: descriptor chain in, validated [`Request`] out.
//!
//! Pure: it reads the chain and the guest bytes it names (header, discard segment) and turns
//! data buffers into host iovecs, but never does I/O. It accepts any framing (virtio 1.2,
//! 2.7.4: the header may span descriptors, share one with data, and the status byte is the
//! last byte of the last descriptor). Every address and length is checked against guest
//! memory; every failure is a [`RequestError`] that says where the status byte is (if the
//! chain has a usable one) and which virtio status to write.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use virtio_bindings::virtio_blk;

use super::config::{DiskInfo, ID_BYTES};
use crate::devices::virtio::GuestMemory;

pub const VIRTIO_BLK_T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
pub const VIRTIO_BLK_T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
pub const VIRTIO_BLK_T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
pub const VIRTIO_BLK_T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
pub const VIRTIO_BLK_T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;

pub const VIRTIO_BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// `virtio_blk_discard_write_zeroes.flags`: unmap.
pub const DWZ_FLAG_UNMAP: u32 = virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
const HEADER_LEN: usize = 16;
const DWZ_SEG_LEN: usize = 16;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A validated request. Its data buffers are in the iovec array given to [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    /// First sector (IN, OUT, DISCARD, WRITE_ZEROES).
    pub sector: u64,
    /// Data bytes: IN/OUT transfer length, GET_ID bytes to write (≤ 20).
    pub data_len: u32,
    /// Number of iovecs filled.
    pub niov: usize,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    /// DISCARD / WRITE_ZEROES: number of sectors.
    pub num_sectors: u32,
    /// WRITE_ZEROES: the driver allows deallocation.
    pub unmap: bool,
    /// Some data buffer is not 512-byte aligned in address or length (O_DIRECT refuses it).
    pub unaligned: bool,
}

impl Request {
    /// Bytes the device writes into the chain on success (the used length).
    pub fn used_len_ok(&self) -> u32 {
        match self.kind {
            RequestType::In | RequestType::GetId => self.data_len + 1,
            _ => 1,
        }
    }

    /// Byte offset on the disk.
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Descriptor chain is empty or unreadable (an indirect table that nests, has a length not a multiple of 16, or lies outside guest memory yields no descriptor)")]
    EmptyChain,
    #[error("Descriptor chain is broken (loop, longer than the queue, bad index or nested indirect table)")]
    BrokenChain,
    #[error("Last descriptor is not device-writable or has length 0, so there is no status byte")]
    NoStatus,
    #[error("Status byte at {0:#x} is outside guest memory")]
    StatusOutOfRange(u64),
    #[error("Chain has more than {0} descriptors")]
    TooManySegments(usize),
    #[error("Request header is shorter than 16 bytes")]
    HeaderTooShort,
    #[error("Request header is device-writable")]
    HeaderWritable,
    #[error("Buffer {addr:#x}+{len:#x} is outside guest memory")]
    AddressOutOfRange { addr: u64, len: u32 },
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
    #[error("Data buffer has the wrong direction for the request type")]
    WrongDirection,
    #[error("Data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("Sectors {sector}+{count} are beyond the disk end ({capacity} sectors)")]
    OutOfDisk {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("Write to a read-only disk")]
    ReadOnly,
    #[error("Discard/write-zeroes payload of {0} bytes is not exactly one 16-byte segment")]
    BadSegmentCount(u64),
    #[error("Discard/write-zeroes flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("Discard range {sector}+{count} is not aligned to {align} sectors")]
    UnalignedDiscard { sector: u64, count: u32, align: u32 },
    #[error("Discard/write-zeroes of {count} sectors (0 or above the limit {max})")]
    BadDiscardSize { count: u32, max: u32 },
}

impl ParseError {
    /// The virtio status this error completes the request with.
    pub fn status(&self) -> u8 {
        match self {
            ParseError::Unsupported(_) | ParseError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A failed parse: the status byte (when the chain has a usable one) and the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct RequestError {
    pub status: Option<GuestAddress>,
    pub error: ParseError,
}

/// One descriptor's buffer as the parser sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// An empty iovec, to preallocate arrays.
pub const IOVEC_EMPTY: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// Parses one chain. `scratch` bounds the number of descriptors (seg_max + 2 is right);
/// `iov` receives the data buffers as host iovecs and bounds their number.
pub fn parse<I>(
    chain: I,
    mem: &GuestMemory,
    disk: &DiskInfo,
    scratch: &mut [Segment],
    iov: &mut [libc::iovec],
) -> Result<Request, RequestError>
where
    I: Iterator<Item = Descriptor>,
{
    let mut n = 0usize;
    let mut last: Option<Descriptor> = None;
    for d in chain {
        if let Some(s) = scratch.get_mut(n) {
            *s = Segment {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
            };
        }
        n += 1;
        last = Some(d);
    }
    let err = |status, error| RequestError { status, error };
    let last = last.ok_or(err(None, ParseError::EmptyChain))?;
    if last.has_next() {
        // The iterator stopped early: a loop, a chain longer than the queue, a next index
        // out of range, an unreadable descriptor or a nested indirect table.
        return Err(err(None, ParseError::BrokenChain));
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(err(None, ParseError::NoStatus));
    }
    let status_addr = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(err(None, ParseError::StatusOutOfRange(last.addr().0)))?;
    if host_range(mem, status_addr, 1).is_none() {
        return Err(err(None, ParseError::StatusOutOfRange(status_addr)));
    }
    let status = Some(GuestAddress(status_addr));
    if n > scratch.len() {
        return Err(err(status, ParseError::TooManySegments(scratch.len())));
    }
    let segs = &mut scratch[..n];
    segs[n - 1].len -= 1;
    parse_body(segs, mem, disk, iov, GuestAddress(status_addr)).map_err(|e| err(status, e))
}

/// Reads `out.len()` device-readable bytes starting at segment `*idx`, byte `*off`, advancing
/// the cursor.
fn read_bytes(
    mem: &GuestMemory,
    segs: &[Segment],
    idx: &mut usize,
    off: &mut u32,
    out: &mut [u8],
    short: ParseError,
) -> Result<(), ParseError> {
    let mut got = 0;
    while got < out.len() {
        let s = segs.get(*idx).ok_or(short)?;
        if *off >= s.len {
            *idx += 1;
            *off = 0;
            continue;
        }
        if s.write {
            return Err(if short == ParseError::HeaderTooShort {
                ParseError::HeaderWritable
            } else {
                ParseError::WrongDirection
            });
        }
        let take = ((s.len - *off) as usize).min(out.len() - got);
        let addr = s
            .addr
            .checked_add(u64::from(*off))
            .ok_or(ParseError::AddressOutOfRange {
                addr: s.addr,
                len: s.len,
            })?;
        match host_range(mem, addr, take as u64) {
            Some(p) => {
                let dst = &mut out[got..got + take];
                if p as usize % 8 == 0 && take % 8 == 0 {
                    for (i, w) in dst.chunks_exact_mut(8).enumerate() {
                        // SAFETY: as below; `p` is 8-aligned and `i * 8 + 8 <= take`.
                        let v = unsafe { std::ptr::read_volatile(p.cast::<u64>().add(i)) };
                        w.copy_from_slice(&v.to_ne_bytes());
                    }
                } else {
                    for (i, b) in dst.iter_mut().enumerate() {
                        // Volatile: the guest may write it concurrently.
                        // SAFETY: `host_range` checked `p..p+take` lies in one region `mem` keeps mapped.
                        *b = unsafe { std::ptr::read_volatile(p.add(i)) };
                    }
                }
            }
            None => mem
                .read_slice(&mut out[got..got + take], GuestAddress(addr))
                .map_err(|_| ParseError::AddressOutOfRange {
                    addr: s.addr,
                    len: s.len,
                })?,
        }
        got += take;
        *off += take as u32;
    }
    Ok(())
}

/// Maps the data segments (from `idx`/`off` on) to iovecs, checking their direction. Returns
/// (total bytes, iovecs used, OR of every iovec base and length: its low bits show misalignment).
fn map_data(
    mem: &GuestMemory,
    segs: &[Segment],
    idx: usize,
    off: u32,
    write: bool,
    iov: &mut [libc::iovec],
) -> Result<(u64, usize, usize), ParseError> {
    let mut total = 0u64;
    let mut k = 0usize;
    let mut bits = 0usize;
    let cap = iov.len();
    for (i, s) in segs.iter().enumerate().skip(idx) {
        let skip = if i == idx { off } else { 0 };
        if s.len <= skip {
            continue;
        }
        if s.write != write {
            return Err(ParseError::WrongDirection);
        }
        let len = s.len - skip;
        let addr = s
            .addr
            .checked_add(u64::from(skip))
            .ok_or(ParseError::AddressOutOfRange {
                addr: s.addr,
                len: s.len,
            })?;
        let oob = ParseError::AddressOutOfRange { addr, len };
        if let Some(p) = host_range(mem, addr, u64::from(len)) {
            let v = iov.get_mut(k).ok_or(ParseError::TooManySegments(cap))?;
            *v = libc::iovec {
                iov_base: p.cast(),
                iov_len: len as usize,
            };
            bits |= p as usize | len as usize;
            k += 1;
            total += u64::from(len);
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(oob);
        }
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(addr), len as usize) {
            let slice = slice.map_err(|_| oob)?;
            let v = iov.get_mut(k).ok_or(ParseError::TooManySegments(cap))?;
            *v = libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            };
            bits |= v.iov_base as usize | v.iov_len;
            k += 1;
        }
        total += u64::from(len);
    }
    Ok((total, k, bits))
}

fn check_range(disk: &DiskInfo, sector: u64, count: u64) -> Result<(), ParseError> {
    match sector.checked_add(count) {
        Some(end) if end <= disk.capacity_sectors => Ok(()),
        _ => Err(ParseError::OutOfDisk {
            sector,
            count,
            capacity: disk.capacity_sectors,
        }),
    }
}

fn parse_body(
    segs: &[Segment],
    mem: &GuestMemory,
    disk: &DiskInfo,
    iov: &mut [libc::iovec],
    status: GuestAddress,
) -> Result<Request, ParseError> {
    let (mut idx, mut off) = (0usize, 0u32);
    let mut hdr = [0u8; HEADER_LEN];
    read_bytes(
        mem,
        segs,
        &mut idx,
        &mut off,
        &mut hdr,
        ParseError::HeaderTooShort,
    )?;
    let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let mut req = Request {
        kind: RequestType::Flush,
        sector,
        data_len: 0,
        niov: 0,
        status,
        num_sectors: 0,
        unmap: false,
        unaligned: false,
    };
    match ty {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write_to_guest = ty == VIRTIO_BLK_T_IN;
            req.kind = if write_to_guest {
                RequestType::In
            } else {
                RequestType::Out
            };
            if !write_to_guest && disk.readonly {
                return Err(ParseError::ReadOnly);
            }
            let (len, k, bits) = map_data(mem, segs, idx, off, write_to_guest, iov)?;
            req.unaligned = bits & (SECTOR_SIZE as usize - 1) != 0;
            if len % SECTOR_SIZE != 0 {
                return Err(ParseError::UnalignedLength(len));
            }
            check_range(disk, sector, len >> SECTOR_SHIFT)?;
            req.data_len = u32::try_from(len).map_err(|_| ParseError::UnalignedLength(len))?;
            req.niov = k;
        }
        VIRTIO_BLK_T_FLUSH => req.kind = RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => {
            req.kind = RequestType::GetId;
            let (len, k, _) = map_data(mem, segs, idx, off, true, iov)?;
            req.data_len = len.min(ID_BYTES as u64) as u32;
            req.niov = k;
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = ty == VIRTIO_BLK_T_DISCARD;
            req.kind = if discard {
                RequestType::Discard
            } else {
                RequestType::WriteZeroes
            };
            if disk.readonly {
                return Err(ParseError::ReadOnly);
            }
            let payload: u64 =
                segs.iter().skip(idx).map(|s| u64::from(s.len)).sum::<u64>() - u64::from(off);
            if payload != DWZ_SEG_LEN as u64 {
                return Err(ParseError::BadSegmentCount(payload));
            }
            let mut seg = [0u8; DWZ_SEG_LEN];
            read_bytes(
                mem,
                segs,
                &mut idx,
                &mut off,
                &mut seg,
                ParseError::BadSegmentCount(payload),
            )?;
            let s_sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            if flags & !DWZ_FLAG_UNMAP != 0 || (discard && flags != 0) {
                return Err(ParseError::UnsupportedFlags(flags));
            }
            let max = if discard {
                disk.max_discard_sectors
            } else {
                disk.max_write_zeroes_sectors
            };
            if count == 0 || count > max {
                return Err(ParseError::BadDiscardSize { count, max });
            }
            let align = u64::from(disk.discard_align_sectors.max(1));
            if discard && (s_sector % align != 0 || u64::from(count) % align != 0) {
                return Err(ParseError::UnalignedDiscard {
                    sector: s_sector,
                    count,
                    align: disk.discard_align_sectors,
                });
            }
            check_range(disk, s_sector, u64::from(count))?;
            req.sector = s_sector;
            req.num_sectors = count;
            req.unmap = flags & DWZ_FLAG_UNMAP != 0;
        }
        other => return Err(ParseError::Unsupported(other)),
    }
    Ok(req)
}

pub(crate) use crate::devices::virtio::queue::host_range;
pub use crate::devices::virtio::queue::Chain;

#[cfg(test)]
mod tests;
