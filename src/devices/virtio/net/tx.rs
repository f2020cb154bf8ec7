//! The TX queue: each chain (header + frame) becomes one `writev` SQE on the tap, all of a
//! pass submitted at once; the used entry goes back when the write completes.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use virtio_queue::QueueT;

use super::frame::{self, TxFrame, IOVEC_EMPTY};
use super::handler::{Core, NetQueueParts};
use super::pairs::PairGate;
use super::tap::VNET_HDR_LEN;
use crate::metrics::QueueMetrics;
use crate::reactor::{QueueHandler, RingCtx};

/// Iovecs per TX chain: Linux sends a GSO frame as the header plus up to 17 page fragments;
/// the rest is slack for buffers that straddle memory regions.
pub const TX_IOV_MAX: usize = 64;

struct Slot {
    busy: bool,
    frame: TxFrame,
    iov: Box<[libc::iovec]>,
    popped: Instant,
    kick: Instant,
}

/// One TX queue served by a reactor.
pub struct TxQueue {
    c: Core,
    slots: Box<[Slot]>,
    in_flight: usize,
    /// Closed while the driver does not use this queue's pair: kicks are ignored.
    gate: Option<PairGate>,
}

impl TxQueue {
    /// Builds the queue state; call on the reactor thread.
    pub fn new(p: NetQueueParts) -> Self {
        let size = usize::from(p.queue.size().max(1));
        let now = Instant::now();
        let slots = (0..size)
            .map(|_| Slot {
                busy: false,
                frame: TxFrame::default(),
                iov: vec![IOVEC_EMPTY; TX_IOV_MAX].into_boxed_slice(),
                popped: now,
                kick: now,
            })
            .collect();
        TxQueue {
            c: Core::new(p),
            slots,
            in_flight: 0,
            gate: None,
        }
    }

    /// Serves the queue only while its pair is in use (MQ).
    pub fn with_gate(mut self, gate: PairGate) -> Self {
        self.gate = Some(gate);
        self
    }

    fn gated(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| !g.open())
    }

    /// Serves `queue` from scratch, keeping the allocations (see [`RxQueue::rearm`](super::rx::RxQueue::rearm)).
    #[cfg(any(test, feature = "fuzz"))]
    pub fn rearm(&mut self, queue: virtio_queue::Queue) {
        assert_eq!(self.in_flight, 0, "rearm with writes in flight");
        self.c.rearm(queue);
        self.slots.iter_mut().for_each(|s| s.busy = false);
    }

    /// The state the RX, TX and control queues share.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn core(&self) -> &Core {
        &self.c
    }

    fn finish(&mut self, head: u16, ok: Option<(u32, Instant, Instant)>, now: Instant) {
        self.c.add_used(head, 0, now);
        if let Some((len, popped, kick)) = ok {
            let m = &mut self.c.p.metrics;
            m.counters.writes += 1;
            m.counters.bytes_written += u64::from(len) - VNET_HDR_LEN as u64;
            m.record_service(now.saturating_duration_since(popped));
            m.record_k2c(now.saturating_duration_since(kick));
        }
    }
}

impl QueueHandler for TxQueue {
    fn kick_fd(&self) -> RawFd {
        self.c.p.kick.as_raw_fd()
    }

    fn file_fd(&self) -> Option<RawFd> {
        self.c.p.tap_fd
    }

    fn poll_window(&self) -> Option<Duration> {
        self.c.p.poll
    }

    fn kicked(&mut self, now: Instant) {
        self.c.kicked(now);
    }

    fn set_notify(&mut self, enable: bool) -> bool {
        // A closed queue's waiting chains must not keep the reactor spinning: it sleeps
        // until the next kick.
        self.c.set_notify(enable) && !self.gated()
    }

    fn poll_avail(&mut self, ctx: &mut RingCtx<'_, '_>, budget: usize) -> usize {
        if self.c.broken {
            return 0;
        }
        if self.gated() {
            self.c.last_kick = None;
            return 0;
        }
        let kick = self.c.last_kick.take().unwrap_or(ctx.now);
        if !self.c.avail_sane(ctx.now) {
            return 0;
        }
        let now = ctx.now;
        let mut n = 0;
        while n < budget {
            let Some(chain) = self.c.p.queue.pop_descriptor_chain(&self.c.p.mem) else {
                break;
            };
            n += 1;
            let head = chain.head_index();
            let h = usize::from(head);
            if self.slots.get(h).is_none_or(|s| s.busy) {
                self.c.fail_queue(
                    &format!("descriptor head {head} made available while in flight"),
                    now,
                );
                break;
            }
            let fr =
                match frame::parse_tx(chain, &self.c.p.mem, self.c.p.acked, &mut self.slots[h].iov)
                {
                    Ok(fr) => fr,
                    Err(e) => {
                        self.c
                            .drop_chain(format_args!("TX chain (head {head}): {e}"), now);
                        self.finish(head, None, now);
                        continue;
                    }
                };
            let slot = &mut self.slots[h];
            slot.frame = fr;
            slot.popped = now;
            slot.kick = kick;
            slot.busy = true;
            let e = opcode::Writev::new(
                types::Fixed(self.c.p.fixed),
                slot.iov.as_ptr(),
                fr.niov as u32,
            )
            .build();
            // SAFETY: the slot is not reused before its completion (`busy`), and the reactor keeps
            // the handler and `mem` until `in_flight` is 0: iovecs and buffers outlive the write.
            match unsafe { ctx.push(e, u32::from(head)) } {
                Ok(()) => self.in_flight += 1,
                Err(e) => {
                    slot.busy = false;
                    self.c
                        .drop_chain(format_args!("cannot submit a write: {e}"), now);
                    self.finish(head, None, now);
                }
            }
        }
        self.c.p.metrics.record_batch(n);
        n
    }

    fn poll_hit(&mut self) {
        self.c.p.metrics.counters.poll_hits += 1;
    }

    fn complete(&mut self, ctx: &mut RingCtx<'_, '_>, tag: u32, res: i32) {
        let h = tag as usize;
        let now = ctx.now;
        let Some(slot) = self.slots.get_mut(h).filter(|s| s.busy) else {
            log::error!("{}: completion for idle slot {h}", self.c.p.name);
            return;
        };
        slot.busy = false;
        self.in_flight -= 1;
        let (fr, popped, kick) = (slot.frame, slot.popped, slot.kick);
        if res >= 0 && res as u32 == fr.len {
            self.finish(tag as u16, Some((fr.len, popped, kick)), now);
        } else {
            let why = if res < 0 {
                std::io::Error::from_raw_os_error(-res).to_string()
            } else {
                format!("short write of {res} of {} bytes", fr.len)
            };
            self.c.drop_chain(
                format_args!("TX frame of {} bytes (head {h}): {why}", fr.len),
                now,
            );
            self.finish(tag as u16, None, now);
        }
    }

    fn publish(&mut self) {
        self.c.publish();
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn metrics(&self) -> &QueueMetrics {
        &self.c.p.metrics
    }
    fn metrics_mut(&mut self) -> &mut QueueMetrics {
        &mut self.c.p.metrics
    }
}
