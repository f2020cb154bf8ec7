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

fn tx(
    drv: &mut TestDriver,
    q: &mut virtio_queue::Queue,
    bufs: &[Buf],
    acked: u64,
) -> Result<TxFrame, FrameError> {
    use virtio_queue::QueueT;
    let head = drv.write_chain(bufs);
    drv.publish(head);
    let mem = drv.mem.clone();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut iov = [IOVEC_EMPTY; 8];
    parse_tx(chain, &mem, acked, &mut iov)
}

fn rx(
    drv: &mut TestDriver,
    q: &mut virtio_queue::Queue,
    bufs: &[Buf],
) -> Result<RxBuf, FrameError> {
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
    let h = VnetHdr {
        flags: 1,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 1,
    };
    let b = h.to_bytes();
    assert_eq!(&b[4..6], &1448u16.to_le_bytes());
    assert_eq!(VnetHdr::from_bytes(&b), h);
}

#[test]
fn test_check_tx_offloads_need_negotiation() {
    let tso = VnetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        ..Default::default()
    };
    assert_eq!(tso.check_tx(ALL), Ok(()));
    assert!(matches!(
        tso.check_tx(f::CSUM),
        Err(FrameError::NotNegotiated(_, "HOST_TSO4"))
    ));
    let csum = VnetHdr {
        flags: HDR_F_NEEDS_CSUM,
        ..Default::default()
    };
    assert!(matches!(
        csum.check_tx(0),
        Err(FrameError::NotNegotiated(_, "CSUM"))
    ));
    let ecn = VnetHdr {
        gso_type: GSO_TCPV6 | GSO_ECN,
        gso_size: 1,
        ..Default::default()
    };
    assert!(matches!(
        ecn.check_tx(ALL & !f::HOST_ECN),
        Err(FrameError::NotNegotiated(_, "HOST_ECN"))
    ));
    assert_eq!(
        VnetHdr {
            gso_type: 7,
            ..Default::default()
        }
        .check_tx(ALL),
        Err(FrameError::BadGsoType(7))
    );
    assert_eq!(
        VnetHdr {
            flags: 0x40,
            ..Default::default()
        }
        .check_tx(ALL),
        Err(FrameError::BadFlags(0x40))
    );
    assert_eq!(
        VnetHdr {
            gso_type: GSO_TCPV4,
            ..Default::default()
        }
        .check_tx(ALL),
        Err(FrameError::BadGsoType(GSO_TCPV4))
    );
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
    let h = hdr_at(
        &mut drv,
        VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 9000,
            flags: HDR_F_NEEDS_CSUM,
            ..Default::default()
        },
    );
    let fr = tx(
        &mut drv,
        &mut q,
        &[Buf::r(h, 5), Buf::r(GuestAddress(h.0 + 5), 7 + 40)],
        ALL,
    )
    .unwrap();
    assert_eq!(fr.hdr.gso_size, 9000);
    assert_eq!(fr.len, 52);
}

#[test]
fn test_parse_tx_short_header_rejected() {
    let (_m, mut drv, mut q) = setup();
    let a = drv.alloc(16);
    assert_eq!(
        tx(&mut drv, &mut q, &[Buf::r(a, 11)], ALL),
        Err(FrameError::HeaderTooShort(11))
    );
}

#[test]
fn test_parse_tx_writable_descriptor_rejected() {
    let (_m, mut drv, mut q) = setup();
    let a = drv.alloc(64);
    assert_eq!(
        tx(&mut drv, &mut q, &[Buf::w(a, 64)], ALL),
        Err(FrameError::TxWritable)
    );
    let h = hdr_at(&mut drv, VnetHdr::default());
    assert_eq!(
        tx(&mut drv, &mut q, &[Buf::r(h, 12), Buf::w(a, 64)], ALL),
        Err(FrameError::TxWritable)
    );
}

#[test]
fn test_parse_tx_outside_guest_memory_rejected() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr::default());
    let e = tx(
        &mut drv,
        &mut q,
        &[Buf::r(h, 12), Buf::r(GuestAddress(MEM as u64 - 8), 64)],
        ALL,
    );
    assert!(
        matches!(e, Err(FrameError::AddressOutOfRange { .. })),
        "{e:?}"
    );
    let e = tx(
        &mut drv,
        &mut q,
        &[Buf::r(h, 12), Buf::r(GuestAddress(u64::MAX - 4), 64)],
        ALL,
    );
    assert!(
        matches!(e, Err(FrameError::AddressOutOfRange { .. })),
        "{e:?}"
    );
}

#[test]
fn test_parse_tx_oversized_frame_rejected() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr::default());
    let big = drv.alloc(u64::from(FRAME_MAX) + 1);
    let e = tx(
        &mut drv,
        &mut q,
        &[Buf::r(h, 12), Buf::r(big, FRAME_MAX + 1)],
        ALL,
    );
    assert_eq!(e, Err(FrameError::TooLarge(u64::from(FRAME_MAX) + 1)));
}

#[test]
fn test_parse_tx_too_many_segments_rejected() {
    let (_m, mut drv, mut q) = setup();
    let h = hdr_at(&mut drv, VnetHdr::default());
    let bufs: Vec<Buf> = std::iter::once(Buf::r(h, 12))
        .chain((0..9).map(|_| Buf::r(h, 1)))
        .collect();
    assert_eq!(
        tx(&mut drv, &mut q, &bufs, ALL),
        Err(FrameError::TooManySegments(8))
    );
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
    assert_eq!(
        rx(&mut drv, &mut q, &[Buf::r(a, 2048)]),
        Err(FrameError::RxReadable)
    );
    assert_eq!(
        rx(&mut drv, &mut q, &[Buf::w(a, 8)]),
        Err(FrameError::HeaderTooShort(8))
    );
    let e = rx(&mut drv, &mut q, &[Buf::w(GuestAddress(MEM as u64), 2048)]);
    assert!(
        matches!(e, Err(FrameError::AddressOutOfRange { .. })),
        "{e:?}"
    );
}

/// Random descriptor tables (any address, length, flags and next index, direct or indirect)
/// never make the parsers panic, and what they accept maps exactly the bytes they report.
#[test]
fn test_parsers_random_chains_never_panic_and_map_exact_lengths() {
    use crate::devices::virtio::block::driver::{F_INDIRECT, F_NEXT, F_WRITE};
    use virtio_queue::QueueT;
    let (mem, mut drv, mut q) = setup();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let table = drv.alloc(16 * 16);
    let mut accepted = 0;
    for _ in 0..20_000 {
        for i in 0..16u16 {
            let r = rnd();
            let addr = match r % 8 {
                0 => u64::MAX - (r >> 40) % 4096,
                1 => MEM as u64 - (r >> 40) % 64,
                _ => (r >> 16) % MEM as u64,
            };
            let len = match (r >> 8) % 4 {
                0 => (r >> 24) as u32,
                _ => ((r >> 24) % 4096) as u32,
            };
            let mut flags = (r >> 3) as u16 & (F_NEXT | F_WRITE);
            if r % 29 == 0 {
                flags |= F_INDIRECT;
            }
            let next = ((r >> 50) % 17) as u16;
            if r % 5 == 0 {
                // An indirect table entry instead of a ring descriptor.
                let at = GuestAddress(table.0 + 16 * u64::from(i));
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&addr.to_le_bytes());
                b[8..12].copy_from_slice(&len.to_le_bytes());
                b[12..14].copy_from_slice(&flags.to_le_bytes());
                b[14..16].copy_from_slice(&next.to_le_bytes());
                mem.write_slice(&b, at).unwrap();
            } else if r % 7 == 0 {
                drv.write_desc(i, table.0, 16 * (1 + (r >> 33) as u32 % 16), F_INDIRECT, 0);
            } else {
                drv.write_desc(i, addr, len, flags, next);
            }
        }
        drv.publish((rnd() % 16) as u16);
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            continue;
        };
        let mut iov = [IOVEC_EMPTY; 8];
        let total =
            |iov: &[libc::iovec], n: usize| iov[..n].iter().map(|v| v.iov_len as u64).sum::<u64>();
        if rnd() % 2 == 0 {
            if let Ok(fr) = parse_tx(chain, &mem, ALL, &mut iov) {
                assert_eq!(total(&iov, fr.niov), u64::from(fr.len));
                accepted += 1;
            }
        } else if let Ok(b) = parse_rx(chain, &mem, &mut iov) {
            assert_eq!(total(&iov, b.niov), u64::from(b.len));
            accepted += 1;
        }
    }
    assert!(accepted > 0, "the generator never produced a valid chain");
}
