//! Drives one [`QueueHandler`] without a reactor loop, for the fuzz harnesses and the
//! generated-chain tests: a pass is the reactor's (kick, notifications off, one bounded pop,
//! notifications on, publish), but the operations a handler queues are only recorded by tag
//! and answered with results the caller makes up, so no input costs a system call and the
//! handlers' completion paths (errors, short transfers, retries, cancellation) see every
//! result a back end could give. Built only with `cfg(test)` or the `fuzz` feature.

use std::time::Instant;

use io_uring::IoUring;

use super::buffers::FixedBuffers;
use super::event_loop::RingCtx;
use super::{QueueHandler, BATCH_MAX};

/// Passes one pop may take before the driver stops (a handler that keeps asking to pop
/// again is a bug the caller sees as a full budget).
const NOTIFY_RETRIES: usize = 4;

/// A dormant ring (never submitted to) and the operations recorded since the last answer.
pub struct InlineRing {
    ring: IoUring,
    bufs: FixedBuffers,
    ops: Vec<u32>,
}

impl InlineRing {
    /// Sets up the ring once; reuse it for every input.
    pub fn new() -> std::io::Result<Self> {
        Ok(InlineRing {
            ring: IoUring::new(8)?,
            bufs: FixedBuffers::new(false),
            ops: Vec::with_capacity(256),
        })
    }

    /// Runs `f` with a recording context.
    pub fn with_ctx<R>(&mut self, f: impl FnOnce(&mut RingCtx<'_, '_>) -> R) -> R {
        let (submitter, mut sq, _) = self.ring.split();
        let mut ctx = RingCtx::recording(
            &mut sq,
            &submitter,
            &mut self.bufs,
            Instant::now(),
            &mut self.ops,
        );
        f(&mut ctx)
    }

    /// One reactor pass over `h` after a kick; returns the chains it popped.
    pub fn pass(&mut self, h: &mut dyn QueueHandler) -> usize {
        h.kicked(Instant::now());
        let mut popped = 0;
        for _ in 0..NOTIFY_RETRIES {
            h.set_notify(false);
            let n = self.with_ctx(|ctx| h.poll_avail(ctx, BATCH_MAX));
            popped += n;
            if n < BATCH_MAX && !h.set_notify(true) {
                break;
            }
        }
        h.publish();
        popped
    }

    /// Operations recorded and not answered yet.
    pub fn pending(&self) -> usize {
        self.ops.len()
    }

    /// Answers every recorded operation (including those queued by the answers themselves,
    /// up to `limit` in all) with `result(tag)`, then publishes. Returns how many it answered.
    pub fn complete_all(
        &mut self,
        h: &mut dyn QueueHandler,
        limit: usize,
        mut result: impl FnMut(u32) -> i32,
    ) -> usize {
        let mut done = 0;
        while done < limit {
            let Some(tag) = self.ops.pop() else { break };
            let res = result(tag);
            self.with_ctx(|ctx| h.complete(ctx, tag, res));
            done += 1;
        }
        h.publish();
        done
    }

    /// Forgets recorded operations (after a handler is abandoned).
    pub fn clear(&mut self) {
        self.ops.clear();
    }
}
