//! MQ pair count (only the pairs the driver set are served; the others' tap queues are
//! detached and their TX kicks ignored) and the MTU set on the tap, on the parent's harness.

use super::lifecycle::ctrl_cmd;
use super::*;

/// How long a kick that must be ignored is given to (wrongly) complete.
const IGNORED: Duration = Duration::from_millis(300);

/// Sends VQ_PAIRS_SET `n` on control queue `ctrl` and returns the ack.
fn set_pairs(h: &mut Harness, ctrl: usize, n: u16) -> u8 {
    let (head, ack) = ctrl_cmd(h, ctrl, CLASS_MQ, MQ_VQ_PAIRS_SET, &n.to_le_bytes());
    h.kick(ctrl);
    assert_eq!(h.wait_used(ctrl, 1), vec![(u32::from(head), 1)]);
    h.q(ctrl).drv.mem.read_obj(ack).unwrap()
}

/// Queues the kernel gives the tap (`real_num_tx_queues`): its attached queues.
fn kernel_tap_queues(tap: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{tap}/queues"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("tx-"))
        })
        .count()
}

/// Queues one TX frame tagged `tag` on TX queue `q` and kicks it; returns the head.
fn send_on(h: &mut Harness, q: usize, tag: u8) -> u16 {
    let d = &mut h.q(q).drv;
    let hd = d.alloc(12);
    d.mem
        .write_slice(&VnetHdr::default().to_bytes(), hd)
        .unwrap();
    let fr = test_frame(tag);
    let a = d.alloc(fr.len() as u64);
    d.mem.write_slice(&fr, a).unwrap();
    let head = d.write_chain(&[Buf::r(hd, 12), Buf::r(a, fr.len() as u32)]);
    d.publish(head);
    h.kick(q);
    head
}

fn used_within(h: &mut Harness, q: usize, wait: Duration) -> Vec<(u32, u32)> {
    let t = Instant::now();
    let mut got = Vec::new();
    while t.elapsed() < wait {
        got.extend(h.q(q).drv.take_used());
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

#[test]
fn test_mq_unused_pair_tx_kicks_ignored_until_pairs_set() {
    let Some(mut h) = harness("queues=2", ACKED | f::MQ, &[0, 1, 2, 3, 4]) else {
        return;
    };
    let cap = capture(h.dev.tap().name());
    // Pair 1 before VQ_PAIRS_SET: not served.
    let first = send_on(&mut h, 3, 61);
    assert_eq!(
        used_within(&mut h, 3, IGNORED),
        vec![],
        "pair 1 served before it was set"
    );
    // Two pairs: the waiting chain goes out at the next kick.
    assert_eq!(set_pairs(&mut h, 4, 2), ACK_OK);
    h.kick(3);
    assert_eq!(h.wait_used(3, 1), vec![(u32::from(first), 0)]);
    assert_eq!(captured_tags(&cap, 1), vec![61]);
    // Back to one pair: pair 1 goes quiet again, pair 0 keeps serving.
    assert_eq!(set_pairs(&mut h, 4, 1), ACK_OK);
    send_on(&mut h, 3, 62);
    assert_eq!(
        used_within(&mut h, 3, IGNORED),
        vec![],
        "pair 1 served after 1 was set"
    );
    let head0 = h.tx_chain(&test_frame(63));
    h.kick(1);
    assert_eq!(h.wait_used(1, 1), vec![(u32::from(head0), 0)]);
    assert_eq!(
        captured_tags(&cap, 1),
        vec![63],
        "only pair 0's frame reached the tap"
    );
}

#[test]
fn test_mq_tap_queues_follow_pair_count() {
    let Some(mut h) = harness("queues=3", ACKED | f::MQ, &[0, 1, 2, 3, 4, 5, 6]) else {
        return;
    };
    let tap = h.dev.tap().name().to_string();
    // Activation: pair 0 only, and the kernel steers every flow to its queue.
    assert_eq!((h.dev.active_pairs(), h.dev.attached_tap_queues()), (1, 1));
    assert_eq!(kernel_tap_queues(&tap), 1);
    for (n, ack, want) in [
        (3u16, ACK_OK, 3),
        (2, ACK_OK, 2),
        (4, ACK_ERR, 2),
        (1, ACK_OK, 1),
    ] {
        assert_eq!(set_pairs(&mut h, 6, n), ack, "VQ_PAIRS_SET {n}");
        assert_eq!(h.dev.active_pairs(), want, "after VQ_PAIRS_SET {n}");
        assert_eq!(h.dev.attached_tap_queues(), want, "after VQ_PAIRS_SET {n}");
        assert_eq!(
            kernel_tap_queues(&tap),
            usize::from(want),
            "after VQ_PAIRS_SET {n}"
        );
    }
}

#[test]
fn test_mq_not_negotiated_leaves_only_pair_zero_attached() {
    let Some(h) = harness("queues=2", ACKED, &[0, 1, 2]) else {
        return;
    };
    assert_eq!(h.dev.attached_tap_queues(), 1);
    assert_eq!(kernel_tap_queues(h.dev.tap().name()), 1);
}

#[test]
fn test_mtu_option_sets_tap_and_config_space() {
    let Some(h) = harness("mtu=9000", ACKED | f::MTU, &[0, 1]) else {
        return;
    };
    let tap = h.dev.tap().name();
    let sysfs = std::fs::read_to_string(format!("/sys/class/net/{tap}/mtu")).unwrap();
    assert_eq!(sysfs.trim(), "9000");
    let mut mtu = [0u8; 2];
    h.dev.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    assert_ne!(h.dev.features() & f::MTU, 0);
}

#[test]
fn test_mtu_refused_by_host_is_start_up_error_naming_tap() {
    let (name, _) = tap_name();
    let cfg: NetConfig = format!("tap={name},mtu=65535").parse().unwrap();
    let pool = ReactorPool::start(
        ReactorOptions {
            cores: vec![0],
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    )
    .unwrap();
    let e = match NetDevice::new(&cfg, &pool) {
        Ok(_) => panic!("a tap does not take MTU 65535"),
        Err(e) => crate::error::error_chain(&e),
    };
    if e.contains("CAP_NET_ADMIN") && !e.contains("MTU") {
        return eprintln!("SKIP: cannot create tap {name}: {e}");
    }
    assert!(e.contains(&format!("MTU 65535 on tap `{name}`")), "{e}");
}
