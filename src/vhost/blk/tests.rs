//! The session without a front end process: a synthetic driver in a memfd that the session
//! maps as SET_MEM_TABLE would hand it, real reactors, a real file.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::block::driver::TestDriver;
use crate::devices::virtio::block::DiskConfig;
use crate::devices::virtio::F_VERSION_1;
use crate::reactor::{ReactorOptions, ReactorPool};
use crate::vmm::exit::ExitHandle;

const MEM: u64 = 4 << 20;
/// Where the "front end" has guest memory mapped (SET_VRING_ADDR carries such addresses).
const FRONT_VA: u64 = 0x7f00_0000_0000;
const WAIT: Duration = Duration::from_secs(5);
const T_OUT: u32 = 1;

struct Rig {
    s: VhostBlk,
    drv: TestDriver,
    kick: EventFd,
    _pool: ReactorPool,
    _disk: tempfile::NamedTempFile,
}

fn file_of(e: &EventFd) -> File {
    // SAFETY: dup returns a new fd (or -1, checked) that the File then owns alone.
    let fd = unsafe { libc::dup(e.as_raw_fd()) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh duplicate nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

fn region() -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(0, MEM, FRONT_VA, 0)
}

/// A session with a 1 MiB disk (2 queues, one reactor) and queue 0 of size 16 started.
fn rig() -> Rig {
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let pool = ReactorPool::start(
        ReactorOptions {
            cores: vec![0],
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    )
    .unwrap();
    let cfg: DiskConfig = format!(
        "path={},queues=2,direct=off,lock=off",
        disk.path().display()
    )
    .parse()
    .unwrap();
    let mut s = VhostBlk::new(BlockDevice::new(&cfg, &pool).unwrap());
    let memfd = tempfile::tempfile().unwrap();
    memfd.set_len(MEM).unwrap();
    let view = MemoryTable::new(
        &[RegionSpec {
            guest_phys_addr: 0,
            size: MEM,
            user_addr: FRONT_VA,
            mmap_offset: 0,
        }],
        vec![memfd.try_clone().unwrap()],
    )
    .unwrap();
    let drv = TestDriver::new(view.memory(), GuestAddress(0), 16, MEM);
    let features = F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    s.set_features(features).unwrap();
    s.set_mem_table(&[region()], vec![memfd], None).unwrap();
    s.set_vring_num(0, 16).unwrap();
    s.set_vring_base(0, 0).unwrap();
    let va = |a: GuestAddress| FRONT_VA + a.0;
    s.set_vring_addr(
        0,
        VhostUserVringAddrFlags::empty(),
        va(drv.desc),
        va(drv.used),
        va(drv.avail),
        0,
    )
    .unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    s.set_vring_kick(0, Some(file_of(&kick))).unwrap();
    s.set_vring_call(0, Some(file_of(&EventFd::new(EFD_NONBLOCK).unwrap())))
        .unwrap();
    assert!(
        !s.vrings[0].started,
        "with PROTOCOL_FEATURES a ring starts disabled"
    );
    s.set_vring_enable(0, true).unwrap();
    assert!(s.vrings[0].started);
    Rig {
        s,
        drv,
        kick,
        _pool: pool,
        _disk: disk,
    }
}

fn write_requests(r: &mut Rig, n: u64) {
    for i in 0..n {
        let b = r
            .drv
            .request(T_OUT, i * 8, Some(&[0xab; 4096]), 4096, false);
        r.drv.publish(b.head);
    }
    r.kick.write(1).unwrap();
}

fn wait_used(r: &Rig, n: u16) {
    let t = Instant::now();
    while r.drv.used_idx() != n {
        assert!(
            t.elapsed() < WAIT,
            "used index {} never reached {n}",
            r.drv.used_idx()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn test_get_vring_base_returns_used_index_with_nothing_left_in_flight() {
    let mut r = rig();
    write_requests(&mut r, 3);
    wait_used(&r, 3);
    write_requests(&mut r, 4);
    let state = r.s.get_vring_base(0).unwrap();
    let base = { state.num };
    // Whatever the queue had popped was completed and published before the answer.
    assert_eq!(base, u32::from(r.drv.used_idx()));
    assert!(base >= 3, "{base}");
    assert!(!r.s.vrings[0].started);
    // Restarted (a new kick, as QEMU sends) it serves the rest from there.
    r.kick = EventFd::new(EFD_NONBLOCK).unwrap();
    r.s.set_vring_base(0, base).unwrap();
    r.s.set_vring_kick(0, Some(file_of(&r.kick))).unwrap();
    assert!(r.s.vrings[0].started);
    r.kick.write(1).unwrap();
    wait_used(&r, 7);
}

#[test]
fn test_new_call_eventfd_on_running_queue_restarts_it_in_place() {
    let mut r = rig();
    write_requests(&mut r, 2);
    wait_used(&r, 2);
    let starts = r.s.starts();
    r.s.set_vring_call(0, None).unwrap();
    assert!(r.s.vrings[0].started);
    assert_eq!(r.s.starts(), starts + 1);
    write_requests(&mut r, 2);
    wait_used(&r, 4);
}

#[test]
fn test_ring_outside_memory_table_is_refused() {
    let mut r = rig();
    let e = r.s.set_vring_addr(
        1,
        VhostUserVringAddrFlags::empty(),
        0x1000,
        0x2000,
        0x3000,
        0,
    );
    assert!(e.is_ok(), "not started yet, so nothing to check");
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let e = r.s.set_vring_kick(1, Some(file_of(&kick)));
    assert!(e.is_ok(), "disabled ring: not started");
    r.s.set_vring_num(1, 16).unwrap();
    assert!(r.s.set_vring_enable(1, true).is_err());
    assert!(!r.s.vrings[1].started);
}

#[test]
fn test_disconnect_stops_queues_and_forgets_the_front_end() {
    let mut r = rig();
    write_requests(&mut r, 2);
    wait_used(&r, 2);
    r.s.disconnect();
    assert!(r.s.mem.is_none() && r.s.vrings.iter().all(|v| !v.started && v.kick.is_none()));
    assert_eq!(r.s.acked_features, 0);
}

#[test]
fn test_config_space_has_capacity_and_num_queues() {
    let mut r = rig();
    let c =
        r.s.get_config(0, 60, VhostUserConfigFlags::empty())
            .unwrap();
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
    assert!(r
        .s
        .get_config(0, 4096, VhostUserConfigFlags::empty())
        .is_err());
}
