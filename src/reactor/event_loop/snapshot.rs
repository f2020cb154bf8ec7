//! The reactor's side of statistics snapshots (see `reactor/snapshot.rs` for the design):
//! fill a lent buffer from the queues, retire a dropped queue's metrics, or copy everything
//! into a report.

use std::time::Duration;

use super::QueueSlot;
use crate::metrics::{QueueRecorder, ReactorMetrics, Report};
use crate::reactor::snapshot::Interval;

/// Reactor side: fills `buf` from the reactor's queues and retired list, without copying a
/// histogram or allocating (unless `buf` has fewer entries than there are queues).
pub(in crate::reactor) fn fill(
    buf: &mut Interval,
    queues: &mut [Option<QueueSlot>],
    retired: &mut Vec<QueueRecorder>,
    metrics: &ReactorMetrics,
) {
    buf.used = 0;
    for q in queues.iter_mut().flatten() {
        if buf.used == buf.queues.len() {
            // More queues than the control side knew of: the one allocation of a new shape.
            let m = q.handler.metrics();
            buf.queues
                .push(QueueRecorder::new(&m.device, m.queue, m.reactor));
        }
        buf.queues[buf.used].take_interval(q.handler.metrics_mut(), &mut q.reported);
        buf.used += 1;
    }
    // Moves the entries; `retired` keeps its capacity for the next detach.
    buf.retired.append(retired);
    buf.reactor.clone_from(metrics);
}

/// Reactor side: keeps the metrics of a queue that was just drained and dropped, as what it
/// recorded since the previous snapshot. Sums with an earlier retired queue of the same
/// device and queue index, so a guest that resets its device in a loop between snapshots
/// leaves one entry, not one per reset.
pub(in crate::reactor) fn retire(retired: &mut Vec<QueueRecorder>, q: &mut QueueSlot) {
    let mut m = std::mem::replace(q.handler.metrics_mut(), QueueRecorder::placeholder());
    m.counters = m.counters.since(&q.reported);
    match retired
        .iter_mut()
        .find(|r| r.device == m.device && r.queue == m.queue)
    {
        Some(r) => r.merge(&m),
        None => retired.push(m),
    }
}

/// Reactor side: what the reactor recorded since its previous snapshot, as a new [`Report`]
/// (copies: for a reactor driven inline, which nothing snapshots, that is everything; and
/// for the answer to a stop).
pub(in crate::reactor) fn report(
    queues: &[Option<QueueSlot>],
    retired: &[QueueRecorder],
    metrics: &ReactorMetrics,
    elapsed: Duration,
) -> Report {
    let mut r = Report::default();
    for m in retired {
        r.add_recorded(&mut m.clone());
    }
    for q in queues.iter().flatten() {
        let mut m = q.handler.metrics().clone();
        m.counters = m.counters.since(&q.reported);
        r.add_recorded(&mut m);
    }
    r.reactors.push(metrics.clone());
    r.elapsed = elapsed;
    r
}
