//! The control queue, answered synchronously on its reactor (a rare, control-path queue):
//! MQ `VQ_PAIRS_SET` is checked and recorded, RX-mode and MAC-filter commands are
//! acknowledged (the tap delivers everything; the guest's stack filters), everything else
//! gets VIRTIO_NET_ERR.

use std::sync::Arc;
use std::time::Instant;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::handler::{drop_chain, NetQueueParts};
use super::pairs::ActivePairs;
use crate::devices::virtio::queue::{DeviceQueue, QueueCore, UsedIndex, Virtqueue};
use crate::reactor::RingCtx;

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

/// The control queue served by a reactor.
pub type CtrlQueue = Virtqueue<CtrlRequests>;

/// The commands of the control queue.
pub struct CtrlRequests {
    acked: u64,
    max_pairs: u16,
    pairs: Arc<ActivePairs>,
}

impl CtrlQueue {
    pub fn new(p: NetQueueParts, max_pairs: u16, pairs: Arc<ActivePairs>) -> Self {
        Virtqueue {
            core: QueueCore::new(p.queue).with_used_index(UsedIndex::PerEntry),
            dev: CtrlRequests {
                acked: p.acked,
                max_pairs,
                pairs,
            },
        }
    }
}

impl CtrlRequests {
    /// Answers one well-formed command: writes the ack byte and gives the chain back.
    fn answer(&self, core: &mut QueueCore, head: u16, cmd: &CtrlCmd, kick: Instant, now: Instant) {
        let mq = self.acked & super::config::features::MQ != 0;
        let ack = answer(cmd, self.max_pairs, mq, &self.pairs);
        let counters = &mut core.metrics_mut().counters;
        if ack == ACK_OK {
            counters.writes += 1;
        } else {
            counters.unsupported += 1;
            if core.may_log(now) {
                log::info!(
                    "{}: answered class {} command {} with VIRTIO_NET_ERR",
                    core.name(),
                    cmd.class,
                    cmd.cmd
                );
            }
        }
        if core.mem().write_obj(ack, cmd.ack).is_err() {
            core.fail("cannot write a control ack", now);
            return;
        }
        core.push_used(head, 1);
        core.metrics_mut()
            .record_k2c(now.saturating_duration_since(kick));
    }
}

impl DeviceQueue for CtrlRequests {
    fn may_poll(&self) -> bool {
        false
    }

    fn pop(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        let now = ctx.now;
        core.avail(now);
        let kick = core.take_kick(now);
        let mut n = 0;
        while n < budget {
            let Some(head) = core.pop(now, |_| false) else {
                break;
            };
            n += 1;
            match parse_ctrl(core.chain(head), core.mem()) {
                Some(Ok(cmd)) => self.answer(core, head, &cmd, kick, now),
                Some(Err(_)) => {
                    drop_chain(
                        core,
                        format_args!("malformed control command (head {head})"),
                        now,
                    );
                    core.push_used(head, 1);
                }
                None => {
                    drop_chain(
                        core,
                        format_args!("control chain without an ack byte (head {head})"),
                        now,
                    );
                    core.push_used(head, 0);
                }
            }
        }
        n
    }

    fn complete(&mut self, core: &mut QueueCore, _ctx: &mut RingCtx<'_, '_>, tag: u32, _res: i32) {
        log::error!("{}: unexpected completion {tag}", core.name());
    }

    fn in_flight(&self) -> usize {
        0
    }

    #[cfg(any(test, feature = "fuzz"))]
    fn rearm(&mut self) {
        let _ = self.pairs.set(1);
    }
}
