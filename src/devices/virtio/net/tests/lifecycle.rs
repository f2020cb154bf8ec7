//! Control queue, feature/config advertisement and lifecycle (reset, stop) of the net
//! device, on the harness of the parent module.

use super::*;

pub(super) fn ctrl_cmd(
    h: &mut Harness,
    q: usize,
    class: u8,
    cmd: u8,
    data: &[u8],
) -> (u16, GuestAddress) {
    let d = &mut h.q(q).drv;
    let c = d.alloc(2 + data.len() as u64);
    d.mem.write_slice(&[class, cmd], c).unwrap();
    d.mem.write_slice(data, GuestAddress(c.0 + 2)).unwrap();
    let ack = d.alloc(1);
    d.mem.write_obj(0xeeu8, ack).unwrap();
    let head = d.write_chain(&[
        Buf::r(c, 2),
        Buf::r(GuestAddress(c.0 + 2), data.len() as u32),
        Buf::w(ack, 1),
    ]);
    d.publish(head);
    (head, ack)
}

#[test]
fn test_ctrl_mq_pairs_set_checked_and_others_answered() {
    let acked = ACKED | f::MQ | f::CTRL_RX;
    let Some(mut h) = harness("queues=2", acked, &[0, 1, 2, 3, 4]) else {
        return;
    };
    let cmds = [
        (
            CLASS_MQ,
            MQ_VQ_PAIRS_SET,
            2u16.to_le_bytes().to_vec(),
            ACK_OK,
        ),
        (
            CLASS_MQ,
            MQ_VQ_PAIRS_SET,
            3u16.to_le_bytes().to_vec(),
            ACK_ERR,
        ),
        (
            CLASS_MQ,
            MQ_VQ_PAIRS_SET,
            0u16.to_le_bytes().to_vec(),
            ACK_ERR,
        ),
        (CLASS_RX, 0, vec![1], ACK_OK),
        (9, 0, vec![0], ACK_ERR),
    ];
    let sent: Vec<_> = cmds
        .iter()
        .map(|(c, k, d, want)| (ctrl_cmd(&mut h, 4, *c, *k, d), *want))
        .collect();
    h.kick(4);
    let used = h.wait_used(4, cmds.len());
    assert_eq!(used.len(), cmds.len());
    for ((head, ack), want) in sent {
        assert!(used.contains(&(u32::from(head), 1)));
        let got: u8 = h.q(4).drv.mem.read_obj(ack).unwrap();
        assert_eq!(got, want, "head {head}");
    }
    assert_eq!(h.dev.active_pairs(), 2);
    assert_eq!(h.dev.read_config(8, &mut [0u8; 2]), ());
}

#[test]
fn test_features_and_config_space_advertise_tap() {
    let Some(h) = harness("queues=2,mac=52:54:00:ab:cd:ef", ACKED, &[0, 1]) else {
        return;
    };
    let feats = h.dev.features();
    for bit in [
        F_VERSION_1,
        F_RING_EVENT_IDX,
        F_RING_INDIRECT_DESC,
        f::MAC,
        f::STATUS,
        f::MRG_RXBUF,
        f::CTRL_VQ,
        f::MQ,
        f::CSUM,
        f::HOST_TSO4,
    ] {
        assert_ne!(feats & bit, 0, "feature {bit:#x} missing");
    }
    let mut c = [0u8; 10];
    h.dev.read_config(0, &mut c);
    assert_eq!(c, [0x52, 0x54, 0, 0xab, 0xcd, 0xef, 1, 0, 2, 0]);
    assert_eq!(h.dev.num_queues(), 5);
}

#[test]
fn test_rx_gso_off_offers_no_segmentation_offload_to_the_guest() {
    let Some(h) = harness("rx-gso=off", ACKED, &[0, 1]) else {
        return;
    };
    let feats = h.dev.features();
    for bit in [f::GUEST_TSO4, f::GUEST_TSO6, f::GUEST_ECN, f::GUEST_UFO] {
        assert_eq!(feats & bit, 0, "feature {bit:#x} offered with rx-gso=off");
    }
    assert_ne!(feats & f::MRG_RXBUF, 0);
}

#[test]
fn test_reset_with_posted_reads_returns_each_chain_once() {
    let Some(mut h) = harness("", ACKED | F_RING_EVENT_IDX, &[0, 1]) else {
        return;
    };
    let bufs = h.rx_bufs(8, 2048);
    h.kick(0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        h.q(0).drv.take_used().is_empty(),
        "no traffic expected before the reset"
    );
    // Posted reads wait in the kernel on the tap's poll: no worker thread each, no spinning.
    let passes = h.report().reactors[0].passes;
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        h.report().reactors[0].passes - passes < 20,
        "the reactor spins while reads are posted"
    );
    let workers = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"))
                .is_ok_and(|c| c.starts_with("iou-wrk"))
        })
        .count();
    assert!(
        workers < 8,
        "{workers} io_uring workers: the reads block in io-wq"
    );
    let t = Instant::now();
    h.dev.reset();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "reset took {:?}: posted reads were not cancelled",
        t.elapsed()
    );
    let mut used = h.q(0).drv.take_used();
    used.sort();
    let mut want: Vec<(u32, u32)> = bufs.iter().map(|b| (u32::from(b.0), 0)).collect();
    want.sort();
    assert_eq!(used, want);
    // The device comes back after a reset.
    assert_eq!(
        h.report()
            .queues
            .iter()
            .filter(|q| q.device == h.dev.name())
            .count(),
        2
    );
}

#[test]
fn test_pool_stop_with_posted_reads_drains_promptly() {
    let Some(mut h) = harness("", ACKED, &[0, 1]) else {
        return;
    };
    h.rx_bufs(4, 2048);
    h.kick(0);
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let r = h.pool.take().unwrap().stop().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(r
        .queues
        .iter()
        .any(|q| q.device == h.dev.name() && q.queue == 0));
    assert_eq!(h.q(0).drv.take_used().len(), 4);
}

#[test]
fn test_missing_reactor_is_an_error() {
    let pool = ReactorPool::start(
        ReactorOptions {
            cores: vec![0],
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    )
    .unwrap();
    let cfg: NetConfig = "tap=rvtnone,reactors=3".parse().unwrap();
    let e = NetDevice::new(&cfg, &pool).err().unwrap();
    assert!(e.to_string().contains("reactor 3"), "{e}");
}

#[test]
fn test_tap_offloads_follow_acked_features() {
    use super::tap::*;
    assert_eq!(tap_offloads(f::GUEST_TSO4), 0);
    assert_eq!(
        tap_offloads(f::GUEST_CSUM | f::GUEST_TSO4 | f::GUEST_TSO6),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    );
    // With MRG_RXBUF a GSO frame spans several buffers (rx.rs), so TSO is offered too.
    assert_eq!(
        tap_offloads(f::GUEST_CSUM | f::GUEST_TSO4 | f::GUEST_ECN | f::GUEST_UFO | f::MRG_RXBUF),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN | TUN_F_UFO
    );
    assert_eq!(tap_offloads(f::GUEST_CSUM | f::MRG_RXBUF), TUN_F_CSUM);
}

#[test]
fn test_rx_frame_max_follows_offloads_and_mtu() {
    use super::tap::*;
    assert_eq!(rx_frame_max(TUN_F_CSUM, 1500), 1518);
    assert_eq!(rx_frame_max(TUN_F_CSUM, 9000), 9018);
    assert_eq!(
        rx_frame_max(TUN_F_CSUM | TUN_F_TSO4, 1500),
        frame::FRAME_MAX
    );
    assert_eq!(rx_frame_max(TUN_F_CSUM | TUN_F_UFO, 1500), frame::FRAME_MAX);
    assert_eq!(rx_frame_max(0, 65521), 65521 + 18);
    assert_eq!(rx_frame_max(0, u32::MAX), frame::FRAME_MAX);
}
