//! The TX queue: each chain (header + frame) becomes one `writev` SQE on the tap, all of a
//! pass submitted at once; the used entry goes back when the write completes.

use std::os::fd::RawFd;
use std::time::Instant;

use io_uring::{opcode, types};

use super::frame::{self, TxFrame};
use super::handler::{drop_chain, NetQueueParts};
use super::pairs::PairGate;
use super::tap::VNET_HDR_LEN;
use crate::devices::virtio::queue::{DeviceQueue, QueueCore, Slots, UsedIndex, Virtqueue};
use crate::reactor::RingCtx;

/// Iovecs per TX chain: Linux sends a GSO frame as the header plus up to 17 page fragments;
/// the rest is slack for buffers that straddle memory regions.
pub const TX_IOV_MAX: usize = 64;

/// One TX queue served by a reactor.
pub type TxQueue = Virtqueue<TxRequests>;

/// The frames of one TX queue.
pub struct TxRequests {
    acked: u64,
    tap_fd: Option<RawFd>,
    fixed: u32,
    slots: Slots<TxFrame>,
    /// Closed while the driver does not use this queue's pair: kicks are ignored.
    gate: Option<PairGate>,
}

impl TxQueue {
    /// Builds the queue state; call on the reactor thread.
    pub fn new(p: NetQueueParts) -> Self {
        Virtqueue {
            dev: TxRequests {
                acked: p.acked,
                tap_fd: p.tap_fd,
                fixed: p.fixed,
                slots: Slots::new(&p.queue, TX_IOV_MAX),
                gate: None,
            },
            core: QueueCore::new(p.queue).with_used_index(UsedIndex::PerEntry),
        }
    }
}

impl TxQueue {
    /// Serves the queue only while its pair is in use (MQ).
    pub fn with_gate(mut self, gate: PairGate) -> Self {
        self.dev.gate = Some(gate);
        self
    }
}

impl TxRequests {
    fn gated(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| !g.open())
    }

    /// Gives the chain back (a TX chain is never written to) and counts a frame sent.
    fn sent(core: &mut QueueCore, head: u16, ok: Option<(u32, Instant, Instant)>, now: Instant) {
        core.push_used(head, 0);
        if let Some((len, popped, kick)) = ok {
            let m = core.metrics_mut();
            m.counters.writes += 1;
            m.counters.bytes_written += u64::from(len) - VNET_HDR_LEN as u64;
            m.record_service(now.saturating_duration_since(popped));
            m.record_k2c(now.saturating_duration_since(kick));
        }
    }
}

impl DeviceQueue for TxRequests {
    fn file_fd(&self) -> Option<RawFd> {
        self.tap_fd
    }

    fn set_notify(&mut self, core: &mut QueueCore, enable: bool) -> bool {
        // A closed queue's waiting chains must not keep the reactor spinning: it sleeps
        // until the next kick.
        core.set_notify(enable) && !self.gated()
    }

    fn pop(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        let now = ctx.now;
        let kick = core.take_kick(now);
        if self.gated() {
            return 0;
        }
        core.avail(now);
        let mut n = 0;
        while n < budget {
            let Some(head) = core.pop(now, |h| self.slots.is_busy(h)) else {
                break;
            };
            n += 1;
            let slot = self.slots.get_mut(head);
            let fr = match frame::parse_tx(core.chain(head), core.mem(), self.acked, &mut slot.iov)
            {
                Ok(fr) => fr,
                Err(e) => {
                    drop_chain(core, format_args!("TX chain (head {head}): {e}"), now);
                    Self::sent(core, head, None, now);
                    continue;
                }
            };
            slot.req = fr;
            let e =
                opcode::Writev::new(types::Fixed(self.fixed), slot.iov.as_ptr(), fr.niov as u32)
                    .build();
            // SAFETY: the write reads the slot's iovecs and the guest buffers they name.
            if let Err(e) = unsafe { self.slots.submit(ctx, head, e, kick) } {
                drop_chain(core, format_args!("cannot submit a write: {e}"), now);
                Self::sent(core, head, None, now);
            }
        }
        n
    }

    fn complete(&mut self, core: &mut QueueCore, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32) {
        let now = ctx.now;
        let Some(slot) = self.slots.complete(tag) else {
            log::error!("{}: completion for idle slot {tag}", core.name());
            return;
        };
        let (fr, popped, kick) = (slot.req, slot.popped, slot.kick);
        if res >= 0 && res as u32 == fr.len {
            Self::sent(core, tag as u16, Some((fr.len, popped, kick)), now);
            return;
        }
        let why = if res < 0 {
            std::io::Error::from_raw_os_error(-res).to_string()
        } else {
            format!("short write of {res} of {} bytes", fr.len)
        };
        drop_chain(
            core,
            format_args!("TX frame of {} bytes (head {tag}): {why}", fr.len),
            now,
        );
        Self::sent(core, tag as u16, None, now);
    }

    fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    #[cfg(any(test, feature = "fuzz"))]
    fn rearm(&mut self) {
        self.slots.clear();
    }
}
