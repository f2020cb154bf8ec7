use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::block::driver::{Buf, TestDriver};

const MEM: usize = 1 << 20;
const ALL: u64 = f::CSUM | f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_UFO | f::HOST_ECN;

fn setup() -> (GuestMemory, TestDriver, virtio_queue::Queue) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let drv = TestDriver::new(&mem, GuestAddress(0x1000), 16, MEM as u64);
    let q = drv.queue(false);
    (mem, drv, q)
}

fn tx(drv: &mut TestDriver, q: &mut virtio_queue::Queue, bufs: &[Buf], acked: u64) -> Result<TxFrame, FrameError> {
    use virtio_queue::QueueT;
    let head = drv.write_chain(bufs);
    drv.publish(head);
    let mem = drv.mem.clone();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut iov = [IOVEC_EMPTY; 8];
    parse_tx(chain, &mem, acked, &mut iov)
}

fn rx(drv: &mut TestDriver, q: &mut virtio_queue::Queue, bufs: &[Buf]) -> Result<RxBuf, FrameError> {
    use virtio_queue::QueueT;
    let head = drv.write_chain(bufs);
    drv.publish(head);
    let mem = drv.mem.clone();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut iov = [IOVEC_EMPTY; 8];
    parse_rx(chain, &mem, &mut iov)
}

fn hdr_at(drv: &mut TestDriver, h: VnetHdr) -> GuestAddress {
    let a = drv.alloc(12);
    drv.mem.write_slice(&h.to_bytes(), a).unwrap();
    a
}

#[test]
fn test_vnet_hdr_bytes_round_trip_little_endian() {
    let h = VnetHdr { flags: 1, gso_type: GSO_TCPV4, hdr_len: 54, gso_size: 1448, csum_start: 34, csum_offset: 16, num_buffers: 1 };
    let b = h.to_bytes();
    assert_eq!(&b[4..6], &1448u16.to_le_bytes());
    assert_eq!(VnetHdr::from_bytes(&b), h);
}

#[test]
fn test_check_tx_offloads_need_negotiation() {
    let tso = VnetHdr { flags: HDR_F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: 1448, ..Default::default() };
    assert_eq!(tso.check_tx(ALL), Ok(()));
    assert!(matches!(tso.check_tx(f::CSUM), Err(FrameError::NotNegotiated(_, "HOST_TSO4"))));
    let csum = VnetHdr { flags: HDR_F_NEEDS_CSUM, ..Default::default() };
    assert!(matches!(csum.check_tx(0), Err(FrameError::NotNegotiated(_, "CSUM"))));
    let ecn = VnetHdr { gso_type: GSO_TCPV6 | GSO_ECN, gso_size: 1, ..Default::default() };
    assert!(matches!(ecn.check_tx(ALL & !f::HOST_ECN), Err(FrameError::NotNegotiated(_, "HOST_ECN"))));
    assert_eq!(VnetHdr { gso_type: 7, ..Default::default() }.check_tx(ALL), Err(FrameError::BadGsoType(7)));
    assert_eq!(VnetHdr { flags: 0x40, ..Default::default() }.check_tx(ALL), Err(FrameError::BadFlags(0x40)));
    assert_eq!(VnetHdr { gso_type: GSO_TCPV4, ..Default::default() }.check_tx(ALL), Err(FrameError::BadGsoType(GSO_TCPV4)));
}

#[test]
fn test_parse_tx_header_and_frame_maps_every_byte() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr::default());
    let data = drv.alloc(60);
    let fr = tx(&mut drv, &mut q, &[Buf::r(h, 12), Buf::r(data, 60)], ALL).unwrap();
    assert_eq!((fr.len, fr.niov), (72, 2));
}

#[test]
fn test_parse_tx_header_split_over_descriptors_is_read_whole() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr { gso_type: GSO_TCPV4, gso_size: 9000, flags: HDR_F_NEEDS_CSUM, ..Default::default() });
    let fr = tx(&mut drv, &mut q, &[Buf::r(h, 5), Buf::r(GuestAddress(h.0 + 5), 7 + 40)], ALL).unwrap();
    assert_eq!(fr.hdr.gso_size, 9000);
    assert_eq!(fr.len, 52);
}

#[test]
fn test_parse_tx_short_header_rejected() {
    let (_m, mut drv, mut q) = setup();
    let a = drv.alloc(16);
    assert_eq!(tx(&mut drv, &mut q, &[Buf::r(a, 11)], ALL), Err(FrameError::HeaderTooShort(11)));
}

#[test]
fn test_parse_tx_writable_descriptor_rejected() {
    let (_m, mut drv, mut q) = setup();
    let a = drv.alloc(64);
    assert_eq!(tx(&mut drv, &mut q, &[Buf::w(a, 64)], ALL), Err(FrameError::TxWritable));
    let h = hdr_at(&mut drv, VnetHdr::default());
    assert_eq!(tx(&mut drv, &mut q, &[Buf::r(h, 12), Buf::w(a, 64)], ALL), Err(FrameError::TxWritable));
}

#[test]
fn test_parse_tx_outside_guest_memory_rejected() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr::default());
    let e = tx(&mut drv, &mut q, &[Buf::r(h, 12), Buf::r(GuestAddress(MEM as u64 - 8), 64)], ALL);
    assert!(matches!(e, Err(FrameError::AddressOutOfRange { .. })), "{e:?}");
    let e = tx(&mut drv, &mut q, &[Buf::r(h, 12), Buf::r(GuestAddress(u64::MAX - 4), 64)], ALL);
    assert!(matches!(e, Err(FrameError::AddressOutOfRange { .. })), "{e:?}");
}

#[test]
fn test_parse_tx_oversized_frame_rejected() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr::default());
    let big = drv.alloc(u64::from(FRAME_MAX) + 1);
    let e = tx(&mut drv, &mut q, &[Buf::r(h, 12), Buf::r(big, FRAME_MAX + 1)], ALL);
    assert_eq!(e, Err(FrameError::TooLarge(u64::from(FRAME_MAX) + 1)));
}

#[test]
fn test_parse_tx_too_many_segments_rejected() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr::default());
    let bufs: Vec<Buf> = std::iter::once(Buf::r(h, 12)).chain((0..9).map(|_| Buf::r(h, 1))).collect();
    assert_eq!(tx(&mut drv, &mut q, &bufs, ALL), Err(FrameError::TooManySegments(8)));
}

#[test]
fn test_parse_rx_finds_num_buffers_across_descriptors() {
    let (_m, mut drv, mut q) = setup();
    let a = drv.alloc(11);
    let b = drv.alloc(1600);
    let r = rx(&mut drv, &mut q, &[Buf::w(a, 11), Buf::w(b, 1600)]).unwrap();
    assert_eq!(r.len, 1611);
    assert_eq!(r.num_buffers, [GuestAddress(a.0 + 10), b]);
}

#[test]
fn test_parse_rx_readable_or_short_rejected() {
    let (_m, mut drv, mut q) = setup();
    let a = drv.alloc(2048);
    assert_eq!(rx(&mut drv, &mut q, &[Buf::r(a, 2048)]), Err(FrameError::RxReadable));
    assert_eq!(rx(&mut drv, &mut q, &[Buf::w(a, 8)]), Err(FrameError::HeaderTooShort(8)));
    let e = rx(&mut drv, &mut q, &[Buf::w(GuestAddress(MEM as u64), 2048)]);
    assert!(matches!(e, Err(FrameError::AddressOutOfRange { .. })), "{e:?}");
}
