//! The pure chain parser of virtio-net: it checks a TX or RX descriptor chain, reads and
//! validates the virtio-net header of TX frames and maps the buffers to host iovecs, but
//! never does I/O. Every address, length and flag comes from the guest and is checked.

use virtio_bindings::virtio_net;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::config::features as f;
use super::tap::VNET_HDR_LEN;
use crate::devices::virtio::GuestMemory;

/// Largest Ethernet frame a TX chain may carry after its header: a 64 KiB GSO payload with
/// its Ethernet and VLAN headers.
pub const FRAME_MAX: u32 = 65535 + 14 + 4;

/// `flags` of the header.
pub const HDR_F_NEEDS_CSUM: u8 = virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
pub const HDR_F_DATA_VALID: u8 = virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
/// `gso_type` of the header.
pub const GSO_NONE: u8 = virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;
pub const GSO_TCPV4: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const GSO_UDP: u8 = virtio_net::VIRTIO_NET_HDR_GSO_UDP as u8;
pub const GSO_TCPV6: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const GSO_ECN: u8 = virtio_net::VIRTIO_NET_HDR_GSO_ECN as u8;

/// `struct virtio_net_hdr_v1` (virtio 1.2, 5.1.6), little endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Checks a TX header against the features the driver acknowledged (virtio 1.2, 5.1.6.2:
    /// the driver must not use offloads it did not negotiate).
    pub fn check_tx(&self, acked: u64) -> Result<(), FrameError> {
        if self.flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 {
            return Err(FrameError::BadFlags(self.flags));
        }
        if self.flags & HDR_F_NEEDS_CSUM != 0 && acked & f::CSUM == 0 {
            return Err(FrameError::NotNegotiated(self.gso_type, "CSUM"));
        }
        let need = match self.gso_type & !GSO_ECN {
            GSO_NONE if self.gso_type & GSO_ECN != 0 => {
                return Err(FrameError::BadGsoType(self.gso_type))
            }
            GSO_NONE => return Ok(()),
            GSO_TCPV4 => (f::HOST_TSO4, "HOST_TSO4"),
            GSO_TCPV6 => (f::HOST_TSO6, "HOST_TSO6"),
            GSO_UDP => (f::HOST_UFO, "HOST_UFO"),
            _ => return Err(FrameError::BadGsoType(self.gso_type)),
        };
        if acked & need.0 == 0 {
            return Err(FrameError::NotNegotiated(self.gso_type, need.1));
        }
        if self.gso_type & GSO_ECN != 0 && acked & f::HOST_ECN == 0 {
            return Err(FrameError::NotNegotiated(self.gso_type, "HOST_ECN"));
        }
        if self.gso_size == 0 {
            return Err(FrameError::BadGsoType(self.gso_type));
        }
        Ok(())
    }
}

/// Why a chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty chain")]
    EmptyChain,
    #[error("broken chain (loop, bad next index, nested indirect table or unreadable descriptor)")]
    BrokenChain,
    #[error("chain of {0} bytes is shorter than the 12-byte virtio-net header")]
    HeaderTooShort(u64),
    #[error("TX chain has a device-writable descriptor")]
    TxWritable,
    #[error("RX chain has a device-readable descriptor")]
    RxReadable,
    #[error("buffer at {addr:#x} (+{len}) lies outside guest memory")]
    AddressOutOfRange { addr: u64, len: u32 },
    #[error("chain needs more than {0} iovecs")]
    TooManySegments(usize),
    #[error("frame of {0} bytes is larger than {FRAME_MAX}")]
    TooLarge(u64),
    #[error("header flags {0:#x} are not valid")]
    BadFlags(u8),
    #[error("header gso_type {0:#x} is not valid")]
    BadGsoType(u8),
    #[error("header gso_type {0:#x} uses {1}, which the driver did not negotiate")]
    NotNegotiated(u8, &'static str),
}

/// An empty iovec, to preallocate arrays.
pub const IOVEC_EMPTY: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// A checked TX chain: header and frame in `iov[..niov]`, `len` bytes in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxFrame {
    pub hdr: VnetHdr,
    pub len: u32,
    pub niov: usize,
}

/// A checked RX chain: `len` device-writable bytes in `iov[..niov]`; `num_buffers` is where
/// the two bytes of the header's `num_buffers` field lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBuf {
    pub len: u32,
    pub niov: usize,
    pub num_buffers: [GuestAddress; 2],
}

impl Default for RxBuf {
    fn default() -> Self {
        RxBuf {
            len: 0,
            niov: 0,
            num_buffers: [GuestAddress(0); 2],
        }
    }
}

/// Walks `chain`, requiring every descriptor to be device-writable (`write`) or readable,
/// and maps it into `iov`. Calls `each(offset, addr, len)` for every descriptor in order.
fn map_chain<I>(
    chain: I,
    mem: &GuestMemory,
    write: bool,
    iov: &mut [libc::iovec],
    mut each: impl FnMut(u64, u64, u32),
) -> Result<(u64, usize), FrameError>
where
    I: Iterator<Item = Descriptor>,
{
    let cap = iov.len();
    let mut total = 0u64;
    let mut k = 0usize;
    let mut last: Option<Descriptor> = None;
    for d in chain {
        if d.is_write_only() != write {
            return Err(if write {
                FrameError::RxReadable
            } else {
                FrameError::TxWritable
            });
        }
        let (addr, len) = (d.addr().0, d.len());
        last = Some(d);
        if len == 0 {
            continue;
        }
        let oob = FrameError::AddressOutOfRange { addr, len };
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(oob);
        }
        each(total, addr, len);
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(addr), len as usize) {
            let slice = slice.map_err(|_| oob)?;
            let v = iov.get_mut(k).ok_or(FrameError::TooManySegments(cap))?;
            *v = libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            };
            k += 1;
        }
        total += u64::from(len);
    }
    match last {
        None => Err(FrameError::EmptyChain),
        // The iterator stopped early: a loop, a chain longer than the queue, a next index out
        // of range or a nested indirect table.
        Some(d) if d.has_next() => Err(FrameError::BrokenChain),
        Some(_) => Ok((total, k)),
    }
}

/// Parses a TX chain: header then frame, all device-readable, inside guest memory, with a
/// header that uses only negotiated offloads.
pub fn parse_tx<I>(
    chain: I,
    mem: &GuestMemory,
    acked: u64,
    iov: &mut [libc::iovec],
) -> Result<TxFrame, FrameError>
where
    I: Iterator<Item = Descriptor>,
{
    let mut raw = [0u8; VNET_HDR_LEN];
    let mut bad_read = None;
    let (total, niov) = map_chain(chain, mem, false, iov, |off, addr, len| {
        if off >= VNET_HDR_LEN as u64 {
            return;
        }
        let take = (VNET_HDR_LEN - off as usize).min(len as usize);
        if mem
            .read_slice(
                &mut raw[off as usize..off as usize + take],
                GuestAddress(addr),
            )
            .is_err()
        {
            bad_read = Some(FrameError::AddressOutOfRange { addr, len });
        }
    })?;
    if let Some(e) = bad_read {
        return Err(e);
    }
    if total < VNET_HDR_LEN as u64 {
        return Err(FrameError::HeaderTooShort(total));
    }
    if total - VNET_HDR_LEN as u64 > u64::from(FRAME_MAX) {
        return Err(FrameError::TooLarge(total - VNET_HDR_LEN as u64));
    }
    let hdr = VnetHdr::from_bytes(&raw);
    hdr.check_tx(acked)?;
    Ok(TxFrame {
        hdr,
        len: total as u32,
        niov,
    })
}

/// Parses an RX chain: device-writable buffers inside guest memory with room for at least
/// the header.
pub fn parse_rx<I>(
    chain: I,
    mem: &GuestMemory,
    iov: &mut [libc::iovec],
) -> Result<RxBuf, FrameError>
where
    I: Iterator<Item = Descriptor>,
{
    let mut nb = [GuestAddress(0); 2];
    let (total, niov) = map_chain(chain, mem, true, iov, |off, addr, len| {
        // num_buffers is bytes 10 and 11 of the header, which may straddle descriptors.
        for (i, at) in nb.iter_mut().enumerate() {
            let want = 10 + i as u64;
            if want >= off && want < off + u64::from(len) {
                *at = GuestAddress(addr + (want - off));
            }
        }
    })?;
    if total < VNET_HDR_LEN as u64 {
        return Err(FrameError::HeaderTooShort(total));
    }
    // A chain longer than 4 GiB cannot be read into at once; it only needs to hold one frame.
    Ok(RxBuf {
        len: total.min(u64::from(u32::MAX)) as u32,
        niov,
        num_buffers: nb,
    })
}

#[cfg(test)]
mod tests;
