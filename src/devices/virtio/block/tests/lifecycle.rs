//! Lifecycle: reset with requests in flight, re-activation, busy polling, queue failures
//! that need a reset, SQPOLL, several disks and reactors.

use super::*;

#[test]
fn test_reset_with_requests_in_flight_completes_them_and_stops_touching_memory() {
    let f = image(None, 4096);
    let mut h = harness(Opts {
        file: Some(f),
        cfg: "direct=off,queue-size=256",
        ..Default::default()
    });
    let mut built = Vec::new();
    for i in 0..200u64 {
        let b = h.qs[0].drv.request(
            VIRTIO_BLK_T_OUT,
            i * 16,
            Some(&pattern(i as u8, 8192)),
            8192,
            true,
        );
        built.push(b);
    }
    let heads: Vec<u16> = built.iter().map(|b| b.head).collect();
    h.submit(0, &heads);
    // Let the reactor pop some of them, then reset while writes are in flight.
    while h.qs[0].drv.used_idx() == 0 {
        std::hint::spin_loop();
    }
    h.dev.reset();
    let used = h.qs[0].drv.take_used();
    let after = h.qs[0].drv.used_idx();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        h.qs[0].drv.used_idx(),
        after,
        "no used-ring writes after reset returned"
    );
    let done: std::collections::HashSet<u32> = used.iter().map(|e| e.0).collect();
    for b in &built {
        let st = h.qs[0].drv.status(b);
        if done.contains(&u32::from(b.head)) {
            assert_eq!(st, VIRTIO_BLK_S_OK);
        } else {
            assert_eq!(
                st, 0xff,
                "a request without a used entry must not have a status"
            );
        }
    }
    // The device can be activated again and serves requests.
    let mut d2 = TestDriver::new(&h.mem, GuestAddress(16 << 20), 16, 20 << 20);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let q = ActiveQueue {
        index: 0,
        queue: d2.queue(false),
        kick: kick.try_clone().unwrap(),
        irq: None,
    };
    h.dev.activate(h.mem.clone(), 0, vec![q]).unwrap();
    let b = d2.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
    d2.publish(b.head);
    kick.write(1).unwrap();
    let t = Instant::now();
    while d2.used_idx() == 0 {
        assert!(t.elapsed() < WAIT);
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(d2.status(&b), VIRTIO_BLK_S_OK);
    let rep = h.stop();
    assert_eq!(
        rep.queues.len(),
        1,
        "re-attached queue merges with the retired one"
    );
    assert_eq!(rep.queues[0].counters.writes, done.len() as u64);
}

#[test]
fn test_poll_us_serves_requests_without_kicks() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M,poll-us=200000",
        ..Default::default()
    });
    let b = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
    h.run_one(0, &b);
    // Within the poll window the reactor finds new requests without a kick.
    for i in 0..5u16 {
        let b = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
        h.qs[0].drv.publish(b.head);
        h.wait_used(0, 2 + i);
    }
    let c = h.stop().queues[0].counters.clone();
    assert!(c.poll_hits >= 5, "{c:?}");
    assert_eq!(c.kicks, 1);
}

#[test]
fn test_duplicate_head_in_flight_sets_needs_reset() {
    let f = image(None, 64);
    let mut h = harness(Opts {
        file: Some(f),
        cfg: "direct=off",
        ..Default::default()
    });
    let mut heads = Vec::new();
    let w = h.qs[0]
        .drv
        .request(VIRTIO_BLK_T_OUT, 0, Some(&[1u8; 4096]), 4096, false);
    for _ in 0..3 {
        heads.push(w.head);
    }
    h.submit(0, &heads);
    h.wait_used(0, 1);
    // The second and third copies are either refused (head in flight) or served after the
    // first completed; either way nothing hangs and the device stays usable after a reset.
    h.dev.reset();
    let _ = h.dev.needs_reset();
}

#[test]
fn test_open_missing_file_names_path_and_reason() {
    let p = pool(1);
    let cfg: DiskConfig = "path=/nonexistent/ringvm.img".parse().unwrap();
    let e = BlockDevice::new(&cfg, &p).err().expect("opening must fail");
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| format!(
                "{s}: {}",
                s.source().map(|x| x.to_string()).unwrap_or_default()
            ))
            .unwrap_or_default()
    );
    assert!(
        chain.contains("/nonexistent/ringvm.img") && chain.contains("No such file"),
        "{chain}"
    );
}

#[test]
fn test_activate_with_fewer_queues_ok_and_duplicate_index_fails() {
    let p = pool(1);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut dev = BlockDevice::new(&"backend=null,size=1M,queues=4".parse().unwrap(), &p).unwrap();
    let d = TestDriver::new(&mem, GuestAddress(0x1000), 16, 1 << 20);
    let mk = |i| ActiveQueue {
        index: i,
        queue: d.queue(false),
        kick: EventFd::new(0).unwrap(),
        irq: None,
    };
    assert!(matches!(
        dev.activate(mem.clone(), 0, vec![mk(0), mk(0)]),
        Err(ActivateError::QueueCount { .. })
    ));
    assert!(matches!(
        dev.activate(mem.clone(), 0, vec![mk(7)]),
        Err(ActivateError::QueueCount { .. })
    ));
    dev.activate(mem.clone(), 0, vec![mk(1)]).unwrap();
    dev.reset();
}

#[test]
fn test_config_space_reads_capacity_and_ignores_out_of_range() {
    let p = pool(1);
    let dev = BlockDevice::new(&"backend=null,size=1M,queues=2".parse().unwrap(), &p).unwrap();
    let mut b = [0xffu8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 2048);
    let mut tail = [0xffu8; 4];
    dev.read_config(58, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut tail);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
    assert_eq!(
        dev.features() & (F_VERSION_1 | F_RING_EVENT_IDX | config::features::MQ),
        F_VERSION_1 | F_RING_EVENT_IDX | config::features::MQ
    );
}

#[test]
fn test_pool_stop_reports_busy_and_idle_time() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M",
        ..Default::default()
    });
    for _ in 0..10 {
        let b = h.qs[0].drv.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
        h.run_one(0, &b);
    }
    let rep = h.stop();
    assert_eq!(rep.reactors.len(), 1);
    assert!(
        rep.reactors[0].busy_ns > 0 && rep.reactors[0].idle_ns > 0,
        "{:?}",
        rep.reactors[0]
    );
    assert!(rep.table().contains("reactor0"));
    let _ = std::fs::File::open("/dev/null")
        .unwrap()
        .read_at(&mut [0u8; 1], 0);
}

#[test]
fn test_avail_index_far_ahead_sets_needs_reset_without_serving() {
    let mut h = harness(Opts {
        cfg: "backend=null,size=1M,queue-size=16",
        ..Default::default()
    });
    let avail_idx = GuestAddress(h.qs[0].drv.avail.0 + 2);
    h.mem
        .store(1000u16, avail_idx, std::sync::atomic::Ordering::Release)
        .unwrap();
    h.qs[0].kick.write(1).unwrap();
    let t = Instant::now();
    while !h.dev.needs_reset() {
        assert!(t.elapsed() < WAIT, "device never asked for a reset");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(h.qs[0].drv.used_idx(), 0);
    h.dev.reset();
    assert!(!h.dev.needs_reset());
}

#[test]
fn test_used_ring_outside_memory_sets_needs_reset() {
    let p = pool(1);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut dev = BlockDevice::new(&"backend=null,size=1M".parse().unwrap(), &p).unwrap();
    let mut d = TestDriver::new(&mem, GuestAddress(0x1000), 16, 1 << 20);
    let mut q = d.queue(false);
    virtio_queue::QueueT::set_used_ring_address(&mut q, Some(0xfff0_0000), Some(0));
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    dev.activate(
        mem.clone(),
        0,
        vec![ActiveQueue {
            index: 0,
            queue: q,
            kick: kick.try_clone().unwrap(),
            irq: None,
        }],
    )
    .unwrap();
    let b = d.request(VIRTIO_BLK_T_FLUSH, 0, None, 0, false);
    d.publish(b.head);
    kick.write(1).unwrap();
    let t = Instant::now();
    while !dev.needs_reset() {
        assert!(t.elapsed() < WAIT, "device never asked for a reset");
        std::thread::sleep(Duration::from_micros(200));
    }
    dev.reset();
}

#[test]
fn test_sqpoll_ring_serves_requests() {
    let p = ReactorPool::start(
        ReactorOptions {
            cores: vec![0],
            sqpoll: true,
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    );
    let Ok(p) = p else {
        eprintln!("SQPOLL unavailable here: {}", p.err().unwrap());
        return;
    };
    let f = image(None, 16);
    let cfg: DiskConfig = format!("path={},direct=off", f.path().display())
        .parse()
        .unwrap();
    let mut dev = BlockDevice::new(&cfg, &p).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut d = TestDriver::new(&mem, GuestAddress(0x1000), 16, 1 << 20);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    dev.activate(
        mem.clone(),
        0,
        vec![ActiveQueue {
            index: 0,
            queue: d.queue(true),
            kick: kick.try_clone().unwrap(),
            irq: None,
        }],
    )
    .unwrap();
    let b = d.request(VIRTIO_BLK_T_IN, 1, None, 512, false);
    d.publish(b.head);
    kick.write(1).unwrap();
    let t = Instant::now();
    while d.used_idx() == 0 {
        assert!(t.elapsed() < WAIT);
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(d.status(&b), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, b.data).unwrap();
    assert_eq!(got, pattern_of_image(512, 512));
    dev.reset();
    p.stop().unwrap();
}

#[test]
fn test_tmpfs_direct_falls_back_or_works() {
    let Ok(f) = tempfile::NamedTempFile::new_in("/dev/shm") else {
        return;
    };
    f.as_file().set_len(1 << 20).unwrap();
    let mut h = harness(Opts {
        file: Some(f),
        ..Default::default()
    });
    let data = pattern(5, 512);
    let w = h.qs[0]
        .drv
        .request(VIRTIO_BLK_T_OUT, 3, Some(&data), 512, false);
    assert_eq!(h.run_one(0, &w).0, VIRTIO_BLK_S_OK);
    assert_eq!(read_file(h._file.as_ref().unwrap(), 3 * 512, 512), data);
}

#[test]
fn test_two_disks_share_one_reactor_and_reset_independently() {
    let p = pool(1);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let f = image(None, 16);
    let cfgs = [
        format!("path={},direct=off", f.path().display()),
        "backend=null,size=1M".to_string(),
    ];
    let mut devs = Vec::new();
    let mut drvs = Vec::new();
    for (i, c) in cfgs.iter().enumerate() {
        let mut dev = BlockDevice::new(&c.parse().unwrap(), &p).unwrap();
        let base = i as u64 * (2 << 20);
        let d = TestDriver::new(&mem, GuestAddress(base + 0x1000), 16, base + (2 << 20));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let q = ActiveQueue {
            index: 0,
            queue: d.queue(false),
            kick: kick.try_clone().unwrap(),
            irq: None,
        };
        dev.activate(mem.clone(), 0, vec![q]).unwrap();
        devs.push(dev);
        drvs.push((d, kick));
    }
    let serve = |d: &mut TestDriver, kick: &EventFd| {
        let b = d.request(VIRTIO_BLK_T_IN, 1, None, 512, false);
        let n = d.used_idx();
        d.publish(b.head);
        kick.write(1).unwrap();
        let t = Instant::now();
        while d.used_idx() == n {
            assert!(t.elapsed() < WAIT);
            std::thread::sleep(Duration::from_micros(200));
        }
        d.status(&b)
    };
    for (d, k) in drvs.iter_mut() {
        assert_eq!(serve(d, k), VIRTIO_BLK_S_OK);
    }
    devs[0].reset();
    let (d, k) = &mut drvs[1];
    assert_eq!(
        serve(d, k),
        VIRTIO_BLK_S_OK,
        "the other disk keeps being served"
    );
    let rep = p.stop().unwrap();
    assert_eq!(rep.queues.len(), 2);
    drop(devs); // reset after the pool stopped is quiet and does not block
}

#[test]
fn test_direct_io_with_misaligned_guest_buffers_goes_buffered_ok() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let mut h = harness(Opts {
        file: Some(image(Some(&dir), 64)),
        ..Default::default()
    });
    let data = pattern(77, 1024);
    let d = &mut h.qs[0].drv;
    let (hw, hr) = (d.alloc(16), d.alloc(16));
    let (bw, br) = (d.alloc(2048), d.alloc(2048));
    let (sw, sr) = (d.alloc(1), d.alloc(1));
    let mut hb = [0u8; 16];
    hb[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hb[8..16].copy_from_slice(&5u64.to_le_bytes());
    h.mem.write_slice(&hb, hw).unwrap();
    hb[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h.mem.write_slice(&hb, hr).unwrap();
    let (dw, dr) = (GuestAddress(bw.0 + 8), GuestAddress(br.0 + 8));
    h.mem.write_slice(&data, dw).unwrap();
    let w = d.write_chain(&[Buf::r(hw, 16), Buf::r(dw, 1024), Buf::w(sw, 1)]);
    let w = Built {
        head: w,
        status: sw,
        data: dw,
    };
    assert_eq!(h.run_one(0, &w).0, VIRTIO_BLK_S_OK);
    let d = &mut h.qs[0].drv;
    let r = d.write_chain(&[Buf::r(hr, 16), Buf::w(dr, 1024), Buf::w(sr, 1)]);
    let r = Built {
        head: r,
        status: sr,
        data: dr,
    };
    assert_eq!(h.run_one(0, &r).0, VIRTIO_BLK_S_OK);
    let mut back = vec![0u8; 1024];
    h.mem.read_slice(&mut back, dr).unwrap();
    assert_eq!(back, data);
    assert_eq!(read_file(h._file.as_ref().unwrap(), 5 * 512, 1024), data);
}
