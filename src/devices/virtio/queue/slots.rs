//! [`Slots`]: a queue's request slots, one per descriptor head, allocated when the queue is
//! attached. A slot holds what the device parsed from its chain, the host iovecs of its
//! buffers and its timestamps, and is marked in flight from the submission of its operation
//! to the completion, so the iovecs never move or get reused while the kernel may use them.

use std::io;
use std::time::Instant;

use io_uring::squeue;

use super::QueueParts;
use crate::reactor::RingCtx;

/// An empty iovec, to preallocate arrays.
pub const IOVEC_EMPTY: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// The slot of one descriptor head.
pub struct Slot<T> {
    /// What the device made of the chain.
    pub req: T,
    /// Host iovecs of the chain's buffers (filled by the parser).
    pub iov: Box<[libc::iovec]>,
    /// When the operation was submitted (a request popped, an RX buffer posted).
    pub popped: Instant,
    /// When the kick that announced the request came (or the poll that found it).
    pub kick: Instant,
    busy: bool,
}

/// The request slots of one queue, indexed by descriptor head.
pub struct Slots<T> {
    slots: Box<[Slot<T>]>,
    in_flight: usize,
}

impl<T: Copy + Default> Slots<T> {
    /// One slot per head of the queue in `p`, each with `iovecs` iovecs.
    pub fn new(p: &QueueParts, iovecs: usize) -> Self {
        let now = Instant::now();
        let n = p.queue_size().max(1);
        Slots {
            slots: (0..n)
                .map(|_| Slot {
                    req: T::default(),
                    iov: vec![IOVEC_EMPTY; iovecs].into_boxed_slice(),
                    popped: now,
                    kick: now,
                    busy: false,
                })
                .collect(),
            in_flight: 0,
        }
    }

    /// True while the operation of `head` is in flight (its head must not be popped again).
    pub fn is_busy(&self, head: usize) -> bool {
        self.slots.get(head).is_some_and(|s| s.busy)
    }

    /// The slot of `head`, to parse into (a head the core popped is below the queue size).
    pub fn get_mut(&mut self, head: u16) -> &mut Slot<T> {
        &mut self.slots[usize::from(head)]
    }

    /// Operations submitted and not completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `entry` for the slot of `head`, which stays in flight until
    /// [`complete`](Self::complete) hands it back. On failure the slot stays free.
    ///
    /// # Safety
    /// Every buffer `entry` points to must be the slot's iovecs, guest memory the queue keeps
    /// mapped, or memory that lives as long as the queue (the reactor keeps a queue until
    /// nothing is in flight): see [`RingCtx::push`].
    pub unsafe fn submit(
        &mut self,
        ctx: &mut RingCtx<'_, '_>,
        head: u16,
        entry: squeue::Entry,
        kick: Instant,
    ) -> io::Result<()> {
        // SAFETY: forwarded from the caller; the slot is marked busy below, so its iovecs are
        // neither reused nor freed before the completion.
        unsafe { ctx.push(entry, u32::from(head)) }?;
        let s = &mut self.slots[usize::from(head)];
        s.busy = true;
        s.popped = ctx.now;
        s.kick = kick;
        self.in_flight += 1;
        Ok(())
    }

    /// The slot of a completion whose operation is still in flight, without freeing it (to
    /// retry through [`RingCtx::push`] with the same tag).
    pub fn busy_mut(&mut self, tag: u32) -> Option<&mut Slot<T>> {
        self.slots.get_mut(tag as usize).filter(|s| s.busy)
    }

    /// Frees the slot of a completion; `None` (and nothing changes) if it was not in flight.
    pub fn complete(&mut self, tag: u32) -> Option<&Slot<T>> {
        let s = self.slots.get_mut(tag as usize).filter(|s| s.busy)?;
        s.busy = false;
        self.in_flight -= 1;
        Some(s)
    }

    /// Frees every slot, for a rearmed queue (fuzz harnesses). Nothing may be in flight.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| s.busy = false);
        self.in_flight = 0;
    }
}
