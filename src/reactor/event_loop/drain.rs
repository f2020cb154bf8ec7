//! Draining: a detached (or stopping) queue stops popping, its kick poll is cancelled, and
//! once its last operation came back its slot, files and metrics are released and the
//! detach (or the stop) is answered.

use super::snapshot;
use super::Reactor;
use crate::reactor::MAX_QUEUES_PER_REACTOR;

impl Reactor {
    pub(super) fn begin_drain(&mut self, device: Option<u64>) {
        for q in self.queues.iter_mut().flatten() {
            if device.is_none_or(|d| d == q.device) {
                q.draining = true;
            }
        }
    }

    /// Frees the slots of drained queues whose last completion came back, answers finished
    /// detaches and, when stopping with nothing left, the stop. Returns true once stopped.
    pub(super) fn finish_drains(&mut self) -> bool {
        if self.detaches.is_empty() && self.stopping.is_none() {
            return false;
        }
        for i in 0..self.queues.len() {
            let done = matches!(&self.queues[i], Some(q) if q.draining && !q.kick_armed && q.handler.in_flight() == 0);
            if !done {
                continue;
            }
            let mut q = self.queues[i].take().expect("checked above");
            q.handler.publish();
            if q.has_file {
                for index in [i, i + MAX_QUEUES_PER_REACTOR] {
                    if let Err(e) = self
                        .ring
                        .submitter()
                        .register_files_update(index as u32, &[-1])
                    {
                        log::error!(
                            "reactor{}: cannot unregister the files of queue slot {i}: {e}",
                            self.index
                        );
                    }
                }
            }
            snapshot::retire(&mut self.retired, &mut q);
        }
        while matches!(self.queues.last(), Some(None)) {
            self.queues.pop();
        }
        if self.queues.is_empty() && self.bufs.active() {
            if let Err(e) = self.ring.submitter().unregister_buffers() {
                log::error!(
                    "reactor{}: cannot unregister the fixed buffers: {e}",
                    self.index
                );
            }
            self.bufs.clear();
        }
        let queues = &self.queues;
        self.detaches.retain(|(dev, ack)| {
            let busy = queues.iter().flatten().any(|q| q.device == *dev);
            if !busy {
                let _ = ack.send(());
            }
            busy
        });
        if self.stopping.is_some() && self.queues.iter().all(Option::is_none) {
            let report = self.report();
            if let Some(ack) = self.stopping.take() {
                let _ = ack.send(report);
            }
            return true;
        }
        false
    }
}
