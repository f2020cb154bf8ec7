//! Statistics snapshots without copies on the reactor: the control side hands each reactor a
//! buffer of empty recorders ([`Interval`]) in `Command::Snapshot`; the reactor swaps them
//! with its queues' recorders (a pointer swap per recorder), notes the counters counted
//! since its previous answer, and sends the buffer back. The caller drains that interval
//! into the cumulative [`Report`] it keeps ([`Collector`]), which empties the buffer over the
//! blocks written only, and keeps it for the next snapshot. In steady state nothing is
//! allocated or freed on either side, and the reactor touches no histogram memory at all;
//! buffers grow only when queues are attached (and the reactor allocates only if it has
//! more queues than the buffer it was handed).
//!
//! A queue that detaches between two snapshots is moved whole into the reactor's `retired`
//! list (samples since the previous snapshot, counters as a delta) and shipped with the
//! next snapshot or the stop.
//!
//! The reactor's side (filling a buffer, retiring a queue) is in `event_loop/snapshot.rs`;
//! this module holds only the data both sides share, so it depends on no reactor internals.

use crate::metrics::{QueueRecorder, ReactorMetrics, Report};
use std::sync::mpsc::Receiver;

/// What one reactor recorded since its previous snapshot, in a buffer that travels between
/// the control side and the reactor and back, and is reused.
#[derive(Default)]
pub(crate) struct Interval {
    pub reactor: ReactorMetrics,
    /// Entries `..used` carry a live queue's interval; every entry's recorders are empty
    /// when the buffer is handed to the reactor.
    pub queues: Vec<QueueRecorder>,
    pub used: usize,
    /// Queues retired since the previous snapshot, moved whole.
    pub retired: Vec<QueueRecorder>,
}

/// Control side: the cumulative report of a pool and the buffers lent to its reactors.
pub(crate) struct Collector {
    /// Since pool start, summed over the reactors' intervals.
    pub merged: Report,
    /// Per reactor: its buffer, while it is not lent out.
    pub bufs: Vec<Option<Box<Interval>>>,
    /// Per reactor: a snapshot whose answer has not come back in time; it is awaited before
    /// another is sent, so no interval is lost.
    pub pending: Vec<Option<Receiver<Box<Interval>>>>,
    /// Per reactor: the devices of the queues attached to it (one entry per queue), so its
    /// buffer has an entry for each before the reactor needs one.
    pub attached: Vec<Vec<u64>>,
    /// When `merged` was last brought up to date.
    pub taken: Option<std::time::Instant>,
}

impl Collector {
    pub fn new(cores: &[usize]) -> Self {
        let n = cores.len();
        Collector {
            merged: Report {
                reactors: cores
                    .iter()
                    .enumerate()
                    .map(|(index, &core)| ReactorMetrics {
                        index,
                        core,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            bufs: (0..n).map(|_| Some(Box::default())).collect(),
            pending: (0..n).map(|_| None).collect(),
            attached: vec![Vec::new(); n],
            taken: None,
        }
    }

    /// Adds reactor `index`'s interval into `merged` and empties `buf` for the next time.
    /// Recorders of retired queues become spare entries while the reactor has more queues
    /// attached than entries; the rest are dropped (after a detach, not per snapshot).
    pub fn absorb(&mut self, index: usize, buf: &mut Interval) {
        for q in &mut buf.queues[..buf.used] {
            self.merged.add_recorded(q);
        }
        buf.used = 0;
        let want = self.attached[index].len();
        for mut q in buf.retired.drain(..) {
            self.merged.add_recorded(&mut q);
            if buf.queues.len() < want {
                buf.queues.push(q);
            }
        }
        if let Some(r) = self.merged.reactors.get_mut(index) {
            r.clone_from(&buf.reactor);
        }
    }

    /// Adds a reactor's answer to a stop (a [`report`]) into `merged`.
    pub fn absorb_report(&mut self, index: usize, r: &Report) {
        for q in &r.queues {
            self.merged.add_queue(q);
        }
        if let (Some(to), Some(from)) = (self.merged.reactors.get_mut(index), r.reactors.first()) {
            to.clone_from(from);
        }
    }

    /// Notes a queue of `device` attached to reactor `index` and gives its buffer an entry
    /// for it now (on the caller's thread) rather than at the next snapshot on the reactor.
    pub fn attached(&mut self, index: usize, device: u64) {
        let Some(list) = self.attached.get_mut(index) else {
            return;
        };
        list.push(device);
        let want = list.len();
        if let Some(Some(buf)) = self.bufs.get_mut(index) {
            while buf.queues.len() < want {
                buf.queues.push(QueueRecorder::new("", 0, index));
            }
            buf.retired.reserve(want);
        }
    }

    /// Notes that reactor `index` dropped the queues of `device`.
    pub fn detached(&mut self, index: usize, device: u64) {
        if let Some(list) = self.attached.get_mut(index) {
            list.retain(|&d| d != device);
        }
    }
}
