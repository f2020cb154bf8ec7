//! The block device and reactor pool through the public API, the way the VMM drives them
//! (no /dev/kvm needed: a synthetic driver stands in for the guest).

use std::time::{Duration, Instant};

use ringvm::devices::virtio::block::driver::TestDriver;
use ringvm::devices::virtio::block::request::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use ringvm::devices::virtio::block::{BlockDevice, DiskConfig};
use ringvm::devices::virtio::{ActiveQueue, VirtioDevice, TYPE_BLOCK};
use ringvm::reactor::{ReactorOptions, ReactorPool};
use ringvm::vmm::exit::ExitHandle;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[test]
fn test_vmm_call_shape_serves_io_and_reports_metrics() {
    let exit = ExitHandle::new().unwrap();
    let pool = ReactorPool::start(
        ReactorOptions {
            cores: vec![0, 1],
            sqpoll: false,
            ..Default::default()
        },
        exit.clone(),
    )
    .unwrap();
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let cfg: DiskConfig = format!(
        "path={},queues=2,queue-size=64,direct=off,id=api-disk",
        img.path().display()
    )
    .parse()
    .unwrap();
    let mut dev: Box<dyn VirtioDevice> = Box::new(BlockDevice::new(&cfg, &pool).unwrap());
    assert_eq!(
        (dev.device_type(), dev.num_queues(), dev.queue_max_size()),
        (TYPE_BLOCK, 2, 64)
    );

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut drivers = Vec::new();
    let mut queues = Vec::new();
    for i in 0..2u16 {
        let base = u64::from(i) * (4 << 20);
        let d = TestDriver::new(&mem, GuestAddress(base + 0x1000), 64, base + (4 << 20));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        queues.push(ActiveQueue {
            index: i,
            queue: d.queue(true),
            kick: kick.try_clone().unwrap(),
            irq: Some(irq.try_clone().unwrap()),
        });
        drivers.push((d, kick, irq));
    }
    dev.activate(mem.clone(), dev.features(), queues).unwrap();

    for (i, (d, kick, _)) in drivers.iter_mut().enumerate() {
        let data = vec![i as u8 + 1; 4096];
        let w = d.request(VIRTIO_BLK_T_OUT, 8 * i as u64, Some(&data), 4096, false);
        let r = d.request(VIRTIO_BLK_T_IN, 8 * i as u64, None, 4096, false);
        d.publish(w.head);
        kick.write(1).unwrap();
        wait(d, 1);
        d.publish(r.head);
        kick.write(1).unwrap();
        wait(d, 2);
        assert_eq!(
            (d.status(&w), d.status(&r)),
            (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)
        );
    }

    let snap = pool.snapshot().unwrap();
    assert_eq!(snap.total_requests(), 4);
    assert_eq!(
        snap.queues
            .iter()
            .map(|q| (q.device.as_str(), q.queue))
            .collect::<Vec<_>>(),
        vec![("api-disk", 0), ("api-disk", 1)]
    );
    let table = snap.table();
    assert!(
        table.contains("api-disk") && table.contains("p99.9"),
        "{table}"
    );
    assert!(snap.to_json().contains("\"device\":\"api-disk\""));
    let hlog = tempfile::NamedTempFile::new().unwrap();
    snap.write_hlog(hlog.path()).unwrap();
    let text = std::fs::read_to_string(hlog.path()).unwrap();
    assert!(text.contains("api-disk-q1-k2c"), "{text}");

    dev.reset();
    let report = pool.stop().unwrap();
    assert_eq!(report.reactors.len(), 2);
    assert_eq!(
        report
            .queues
            .iter()
            .map(|q| q.counters.requests())
            .sum::<u64>(),
        4
    );
    assert!(exit.reason().is_none(), "no reactor failed");
}

fn wait(d: &TestDriver, n: u16) {
    let t = Instant::now();
    while d.used_idx() < n {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out");
        std::thread::sleep(Duration::from_micros(100));
    }
}
