//! Ring set-up per queue: attaching a queue gives it a slot, registers its files in the
//! ring's fixed-file table and lays guest memory over the fixed-buffer table; the poll
//! window's maximum can be changed per device.

use std::ops::Range;
use std::time::Duration;

use super::{QueueSlot, Reactor};
use crate::reactor::poll::set_poll_max;
use crate::reactor::{AttachCtx, HandlerFactory, QueueHandler, MAX_QUEUES_PER_REACTOR};

impl Reactor {
    pub(super) fn attach(&mut self, device: u64, factory: HandlerFactory) -> Result<(), String> {
        if self.stopping.is_some() {
            return Err("the reactor is stopping".into());
        }
        let slot = match self.queues.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.queues.len() < MAX_QUEUES_PER_REACTOR => {
                self.queues.push(None);
                self.queues.len() - 1
            }
            None => {
                let n = MAX_QUEUES_PER_REACTOR;
                return Err(format!("reactor{} already serves {n} queues", self.index));
            }
        };
        let alt = slot + MAX_QUEUES_PER_REACTOR;
        let handler = factory(AttachCtx {
            reactor: self.index,
            fixed_file: slot as u32,
            alt_fixed_file: alt as u32,
        })?;
        let mut has_file = false;
        for (index, fd) in [(slot, handler.file_fd()), (alt, handler.alt_file_fd())] {
            if let Some(fd) = fd {
                self.ring
                    .submitter()
                    .register_files_update(index as u32, &[fd])
                    .map_err(|e| format!("cannot register the disk file with io_uring: {e}"))?;
                has_file = true;
            }
        }
        self.register_buffers(&*handler);
        let mut q = QueueSlot::new(device, handler, has_file);
        if let Some((_, max)) = self
            .poll_overrides
            .iter()
            .find(|(k, _)| k.contains(&device))
        {
            set_poll_max(&mut q, *max);
        }
        self.queues[slot] = Some(q);
        Ok(())
    }

    /// Applies a poll-window maximum to `device`'s queues; returns how many it changed.
    pub(super) fn set_poll_max(&mut self, keys: Range<u64>, max: Duration) -> usize {
        match self.poll_overrides.iter_mut().find(|(k, _)| *k == keys) {
            Some(e) => e.1 = max,
            None => self.poll_overrides.push((keys.clone(), max)),
        }
        let mut n = 0;
        for q in self.queues.iter_mut().flatten() {
            if keys.contains(&q.device) && set_poll_max(q, max) {
                n += 1;
            }
        }
        n
    }

    /// Lays the queue's guest memory over the ring's sparse buffer table, once (one VM per
    /// process: every queue sees the same memory); chunks are registered on first use.
    fn register_buffers(&mut self, handler: &dyn QueueHandler) {
        if !self.bufs.enabled() || self.bufs.active() {
            return;
        }
        let regions = handler.guest_memory();
        if regions.is_empty() {
            return;
        }
        if let Err(e) = self
            .ring
            .submitter()
            .register_buffers_sparse(crate::reactor::buffers::TABLE_ENTRIES)
        {
            log::info!(
                "reactor{}: no io_uring fixed buffers ({e}); requests use readv/writev",
                self.index
            );
            self.bufs.disable();
            return;
        }
        self.bufs.set_memory(&regions);
    }
}
