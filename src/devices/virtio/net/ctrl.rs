//! The control queue, answered synchronously on its reactor (a rare, control-path queue):
//! MQ `VQ_PAIRS_SET` is checked and recorded, RX-mode and MAC-filter commands are
//! acknowledged (the tap delivers everything; the guest's stack filters), everything else
//! gets VIRTIO_NET_ERR.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::handler::{Core, NetQueueParts};
use super::pairs::ActivePairs;
use crate::metrics::QueueMetrics;
use crate::reactor::{QueueHandler, RingCtx};

pub const CLASS_RX: u8 = 0;
pub const CLASS_MAC: u8 = 1;
pub const CLASS_MQ: u8 = 4;
pub const MQ_VQ_PAIRS_SET: u8 = 0;
pub const ACK_OK: u8 = 0;
pub const ACK_ERR: u8 = 1;

/// Bytes of a command we look at (class, cmd and the start of its data).
const CMD_PEEK: usize = 8;

/// A parsed control command: class, command, the first data bytes and where the ack goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtrlCmd {
    pub class: u8,
    pub cmd: u8,
    pub data: [u8; CMD_PEEK - 2],
    pub data_len: usize,
    pub ack: GuestAddress,
}

/// Parses a control chain: device-readable command, then a device-writable ack byte last.
/// Returns `None` when there is no place for an ack (the chain can only be returned empty).
pub fn parse_ctrl<I>(
    chain: I,
    mem: &crate::devices::virtio::GuestMemory,
) -> Option<Result<CtrlCmd, GuestAddress>>
where
    I: Iterator<Item = Descriptor>,
{
    let mut peek = [0u8; CMD_PEEK];
    let mut got = 0usize;
    let mut total = 0u64;
    let mut last: Option<Descriptor> = None;
    let mut bad = false;
    for d in chain {
        if !d.is_write_only() {
            if last.is_some_and(|l| l.is_write_only()) {
                bad = true;
            }
            let take = (CMD_PEEK - got).min(d.len() as usize);
            if take > 0
                && mem
                    .read_slice(&mut peek[got..got + take], d.addr())
                    .is_err()
            {
                bad = true;
            }
            got += take;
            total += u64::from(d.len());
        }
        last = Some(d);
    }
    let last = last?;
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let ack = GuestAddress(last.addr().0.checked_add(u64::from(last.len()) - 1)?);
    if mem.write_obj(ACK_ERR, ack).is_err() {
        return None;
    }
    if bad || total < 2 {
        return Some(Err(ack));
    }
    let mut data = [0u8; CMD_PEEK - 2];
    data.copy_from_slice(&peek[2..]);
    Some(Ok(CtrlCmd {
        class: peek[0],
        cmd: peek[1],
        data,
        data_len: (total - 2).min(usize::MAX as u64) as usize,
        ack,
    }))
}

/// The answer to a command; `pairs` is updated on a valid VQ_PAIRS_SET (and the command
/// fails if the tap refuses to follow).
pub fn answer(c: &CtrlCmd, max_pairs: u16, mq: bool, pairs: &ActivePairs) -> u8 {
    match c.class {
        CLASS_RX | CLASS_MAC => ACK_OK,
        CLASS_MQ if mq && c.cmd == MQ_VQ_PAIRS_SET && c.data_len >= 2 => {
            let n = u16::from_le_bytes([c.data[0], c.data[1]]);
            if n >= 1 && n <= max_pairs {
                match pairs.set(n) {
                    Ok(()) => ACK_OK,
                    Err(e) => {
                        pairs.log_refusal(&e);
                        ACK_ERR
                    }
                }
            } else {
                ACK_ERR
            }
        }
        _ => ACK_ERR,
    }
}

/// The control queue handler.
pub struct CtrlQueue {
    c: Core,
    max_pairs: u16,
    pairs: Arc<ActivePairs>,
}

impl CtrlQueue {
    pub fn new(p: NetQueueParts, max_pairs: u16, pairs: Arc<ActivePairs>) -> Self {
        CtrlQueue {
            c: Core::new(p),
            max_pairs,
            pairs,
        }
    }
}

#[cfg(any(test, feature = "fuzz"))]
impl CtrlQueue {
    /// Serves `queue` from scratch, keeping the allocations, for the fuzz harness.
    pub fn rearm(&mut self, queue: virtio_queue::Queue) {
        self.c.rearm(queue);
        let _ = self.pairs.set(1);
    }

    /// The state the RX, TX and control queues share.
    pub fn core(&self) -> &Core {
        &self.c
    }
}

impl QueueHandler for CtrlQueue {
    fn kick_fd(&self) -> RawFd {
        self.c.p.kick.as_raw_fd()
    }

    fn file_fd(&self) -> Option<RawFd> {
        None
    }

    fn poll_window(&self) -> Option<Duration> {
        None
    }

    fn may_poll(&self) -> bool {
        false
    }

    fn kicked(&mut self, now: Instant) {
        self.c.kicked(now);
    }

    fn set_notify(&mut self, enable: bool) -> bool {
        self.c.set_notify(enable)
    }

    fn poll_avail(&mut self, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        if self.c.broken || !self.c.avail_sane(ctx.now) {
            return 0;
        }
        let now = ctx.now;
        let kick = self.c.last_kick.take().unwrap_or(now);
        let mq = self.c.p.acked & super::config::features::MQ != 0;
        let mut n = 0;
        while n < budget {
            let Some(chain) = self.c.p.queue.pop_descriptor_chain(&self.c.p.mem) else {
                break;
            };
            n += 1;
            let head = chain.head_index();
            match parse_ctrl(chain, &self.c.p.mem) {
                Some(Ok(cmd)) => {
                    let ack = answer(&cmd, self.max_pairs, mq, &self.pairs);
                    if ack == ACK_OK {
                        self.c.p.metrics.counters.writes += 1;
                    } else {
                        self.c.p.metrics.counters.unsupported += 1;
                        if self.c.log.allow(now, &self.c.p.name) {
                            log::info!(
                                "{}: answered class {} command {} with VIRTIO_NET_ERR",
                                self.c.p.name,
                                cmd.class,
                                cmd.cmd
                            );
                        }
                    }
                    if self.c.p.mem.write_obj(ack, cmd.ack).is_err() {
                        self.c.fail_queue("cannot write a control ack", now);
                        return n;
                    }
                    self.c.add_used(head, 1, now);
                    self.c
                        .p
                        .metrics
                        .record_k2c(now.saturating_duration_since(kick));
                }
                Some(Err(_)) => {
                    self.c
                        .drop_chain(format_args!("malformed control command (head {head})"), now);
                    self.c.add_used(head, 1, now);
                }
                None => {
                    self.c.drop_chain(
                        format_args!("control chain without an ack byte (head {head})"),
                        now,
                    );
                    self.c.add_used(head, 0, now);
                }
            }
        }
        self.c.p.metrics.record_batch(n);
        n
    }

    fn poll_hit(&mut self) {}

    fn complete(&mut self, _ctx: &mut RingCtx<'_, '_>, tag: u32, _res: i32) {
        log::error!("{}: unexpected completion {tag}", self.c.p.name);
    }

    fn publish(&mut self) {
        self.c.publish();
    }

    fn in_flight(&self) -> usize {
        0
    }

    fn metrics(&self) -> &QueueMetrics {
        &self.c.p.metrics
    }
    fn metrics_mut(&mut self) -> &mut QueueMetrics {
        &mut self.c.p.metrics
    }
}
