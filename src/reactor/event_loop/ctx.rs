//! [`RingCtx`]: what a queue handler sees of its reactor's ring during a pass (push an SQE
//! tagged for the queue, find a fixed buffer), and the user_data encoding that routes each
//! completion back to its queue.

use std::io;
use std::time::Instant;

use io_uring::{squeue, SubmissionQueue, Submitter};

use crate::reactor::buffers::FixedBuffers;

pub(super) const KIND_SHIFT: u32 = 62;
pub(super) const KIND_IO: u64 = 0;
pub(super) const KIND_KICK: u64 = 1;
pub(super) const KIND_WAKE: u64 = 2;
pub(super) const KIND_CANCEL: u64 = 3;

pub(super) fn user_data(kind: u64, slot: usize, tag: u32) -> u64 {
    (kind << KIND_SHIFT) | ((slot as u64 & 0xffff) << 32) | tag as u64
}

pub(super) fn decode(ud: u64) -> (u64, usize, u32) {
    (ud >> KIND_SHIFT, ((ud >> 32) & 0xffff) as usize, ud as u32)
}

/// What a queue handler sees of the ring during a pass.
pub struct RingCtx<'s, 'r> {
    pub(super) sq: &'s mut SubmissionQueue<'r>,
    pub(super) submitter: &'s Submitter<'r>,
    pub(super) bufs: &'s mut FixedBuffers,
    pub(super) slot: usize,
    /// Time the current phase of the pass started (one clock read per phase, not per request).
    pub now: Instant,
    /// Fuzz harnesses: operations are recorded (by tag) instead of queued on the ring.
    #[cfg(any(test, feature = "fuzz"))]
    pub(super) record: Option<&'s mut Vec<u32>>,
}

impl<'s, 'r> RingCtx<'s, 'r> {
    /// A context over `ring`'s queues, for driving a handler outside a reactor (tests).
    #[cfg(test)]
    pub(in crate::reactor) fn for_test(
        sq: &'s mut SubmissionQueue<'r>,
        submitter: &'s Submitter<'r>,
        bufs: &'s mut FixedBuffers,
        now: Instant,
    ) -> Self {
        RingCtx {
            sq,
            submitter,
            bufs,
            slot: 0,
            now,
            record: None,
        }
    }

    /// A context whose operations are only recorded in `record` (by tag), never submitted:
    /// the fuzz harnesses answer them with made-up results.
    #[cfg(any(test, feature = "fuzz"))]
    pub(in crate::reactor) fn recording(
        sq: &'s mut SubmissionQueue<'r>,
        submitter: &'s Submitter<'r>,
        bufs: &'s mut FixedBuffers,
        now: Instant,
        record: &'s mut Vec<u32>,
    ) -> Self {
        RingCtx {
            sq,
            submitter,
            bufs,
            slot: 0,
            now,
            record: Some(record),
        }
    }

    /// The fixed buffer (index in the ring's table) holding all of `[addr, addr + len)`,
    /// registering its chunk on first use; `None`: use a vectored operation.
    pub fn fixed_buffer(&mut self, addr: usize, len: usize) -> Option<u16> {
        self.bufs.index(self.submitter, addr, len)
    }

    /// Queues `entry`, tagged so its completion comes back to this queue's
    /// [`QueueHandler::complete`] with `tag`. Submits early only if the SQ is full.
    ///
    /// # Safety
    /// Every buffer and iovec array `entry` points to must stay valid and unmoved until its
    /// completion has been passed to [`QueueHandler::complete`].
    pub unsafe fn push(&mut self, entry: squeue::Entry, tag: u32) -> io::Result<()> {
        #[cfg(any(test, feature = "fuzz"))]
        if let Some(r) = self.record.as_mut() {
            r.push(tag);
            return Ok(());
        }
        let e = entry.user_data(user_data(KIND_IO, self.slot, tag));
        loop {
            // SAFETY: forwarded from the caller's contract.
            if unsafe { self.sq.push(&e) }.is_ok() {
                return Ok(());
            }
            self.sq.sync();
            self.submitter.submit()?;
            self.sq.sync();
        }
    }
}

pub(super) fn push_raw(
    sq: &mut SubmissionQueue<'_>,
    submitter: &Submitter<'_>,
    e: &squeue::Entry,
) -> io::Result<()> {
    loop {
        // SAFETY: only used for poll and cancel entries, which reference no user memory.
        if unsafe { sq.push(e) }.is_ok() {
            return Ok(());
        }
        sq.sync();
        submitter.submit()?;
        sq.sync();
    }
}
