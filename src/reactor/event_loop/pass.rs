//! The pass: commands and drains, then each queue's turn (kick poll armed, pops, SQEs,
//! publish), one `io_uring_enter` chosen by what the queues need (README, "The reactor"),
//! then reaping completions back to their queues and publishing again.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types};

use super::ctx::{decode, push_raw, user_data, KIND_CANCEL, KIND_IO, KIND_KICK, KIND_WAKE};
use super::{QueueSlot, Reactor, RingCtx, Turn};
use crate::reactor::poll::{choose_in_flight, run_queue, QueueState};
use crate::reactor::InFlightPolicy;

impl Reactor {
    pub(super) fn pass(&mut self, may_wait: bool) -> io::Result<Turn> {
        let t0 = Instant::now();
        self.metrics.passes += 1;
        if self.wake_pending {
            self.wake_pending = false;
            self.handle_commands();
        }
        let stopped = self.finish_drains();
        if stopped {
            return Ok(Turn::Stopped);
        }

        let Reactor {
            ring,
            queues,
            wake,
            wake_armed,
            in_flight_policy,
            adaptive_poll,
            busy_since,
            service_ewma_ns,
            bufs,
            ..
        } = self;
        let (submitter, mut sq, _) = ring.split();
        if !*wake_armed {
            let e = opcode::PollAdd::new(types::Fd(wake.as_raw_fd()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(KIND_WAKE, 0, 0));
            // SAFETY: a poll SQE references no memory.
            push_raw(&mut sq, &submitter, &e)?;
            *wake_armed = true;
        }
        let adaptive = *adaptive_poll;
        let mut more = false;
        let mut polls = false;
        let mut in_flight = 0;
        for (i, slot) in queues.iter_mut().enumerate() {
            let Some(q) = slot else { continue };
            if q.draining {
                if q.kick_armed && !q.cancel_sent {
                    let e = opcode::AsyncCancel::new(user_data(KIND_KICK, i, 0))
                        .build()
                        .user_data(user_data(KIND_CANCEL, i, 0));
                    push_raw(&mut sq, &submitter, &e)?;
                    q.cancel_sent = true;
                }
                in_flight += q.handler.io_in_flight();
                continue;
            }
            if !q.kick_armed && !q.kick_dead {
                let e = opcode::PollAdd::new(types::Fd(q.handler.kick_fd()), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(user_data(KIND_KICK, i, 0));
                push_raw(&mut sq, &submitter, &e)?;
                q.kick_armed = true;
            }
            let state = run_queue(
                q,
                &mut RingCtx {
                    sq: &mut sq,
                    submitter: &submitter,
                    bufs,
                    slot: i,
                    now: t0,
                    #[cfg(any(test, feature = "fuzz"))]
                    record: None,
                },
                adaptive,
            );
            match state {
                QueueState::More => more = true,
                QueueState::Poll => polls = true,
                QueueState::Idle => {}
            }
            in_flight += q.handler.io_in_flight();
            q.handler.publish();
        }
        if in_flight > 0 && busy_since.is_none() {
            *busy_since = Some(t0);
        }
        sq.sync();
        let to_submit = sq.len();
        let taskrun = sq.taskrun() || sq.cq_overflow();
        drop(sq);

        // How to enter the kernel this pass (README, "The reactor"):
        // - a queue has more requests than one batch: submit, reap, go on;
        // - a queue polls and I/O is in flight: as the in-flight policy says (yield the core
        //   to whatever completes the I/O and spin, or wait in the kernel for a completion);
        // - a queue polls and nothing is in flight: spin, entering the kernel only when there
        //   is something to submit or the ring flags completion work;
        // - every queue sleeps with notifications on: block until a kick, a completion or a
        //   control message.
        let t1 = Instant::now();
        self.metrics.busy_ns += (t1 - t0).as_nanos() as u64;
        let mut blocked = false;
        let r = if !may_wait || more {
            Some(submitter.submit_and_wait(0))
        } else if polls {
            let policy = choose_in_flight(
                *in_flight_policy,
                in_flight,
                Duration::from_nanos(*service_ewma_ns),
            );
            if in_flight > 0 && policy == InFlightPolicy::Yield {
                // SAFETY: sched_yield takes no arguments and has no failure that matters.
                unsafe { libc::sched_yield() };
                Some(submitter.submit_and_wait(0))
            } else if in_flight > 0 && policy == InFlightPolicy::Wait {
                // Sleep in the kernel until the completion, a kick or a control message,
                // with no timer: an armed timer costs about 15 µs a wait on the lab's nested
                // host, and timed waits fed that cost back into the estimate that chose them
                // (a control-plane request's hiccup left the reactor in timed waits with 19k
                // timer interrupts a second; perf/RESULTS.md, "Control plane"). Polling
                // queues turn guest notifications on first, so a request added meanwhile
                // kicks (and wakes the wait) instead of waiting for the I/O to complete.
                if notify_for_wait(queues) {
                    Some(submitter.submit_and_wait(0))
                } else {
                    blocked = true;
                    Some(submitter.submit_and_wait(1))
                }
            } else {
                (to_submit > 0 || taskrun).then(|| submitter.submit_and_wait(0))
            }
        } else {
            blocked = true;
            Some(submitter.submit_and_wait(1))
        };
        if let Some(r) = r {
            self.metrics.enters += 1;
            match r {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN | libc::ETIME)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        let t2 = Instant::now();
        // Notifications off again before any completion is published: the driver answers a
        // completion with its next request at once, and must not kick for it.
        for q in self.queues.iter_mut().flatten() {
            if std::mem::take(&mut q.notify_in_wait) {
                q.handler.set_notify(false);
            }
        }
        let waited = (t2 - t1).as_nanos() as u64;
        if blocked {
            self.metrics.idle_ns += waited;
        } else {
            self.metrics.busy_ns += waited;
        }
        let completed = self.reap(t2)?;
        if completed > 0 {
            // How long I/O takes to come back once some is in flight (at QD1: the service
            // time).
            if let Some(since) = self.busy_since.take() {
                let d = t2.saturating_duration_since(since).as_nanos() as u64;
                self.service_ewma_ns = ewma(self.service_ewma_ns, d);
            }
        }
        self.metrics.busy_ns += t2.elapsed().as_nanos() as u64;
        Ok(Turn::Running)
    }

    /// Reaps every completion; returns how many were I/O of a queue.
    fn reap(&mut self, now: Instant) -> io::Result<usize> {
        let index = self.index;
        let Reactor {
            ring,
            queues,
            wake_armed,
            wake_pending,
            bufs,
            ..
        } = self;
        let (submitter, mut sq, mut cq) = ring.split();
        let mut completed = 0;
        cq.sync();
        for cqe in &mut cq {
            let (kind, slot, tag) = decode(cqe.user_data());
            let res = cqe.result();
            match kind {
                KIND_WAKE => {
                    *wake_pending = true;
                    if !cqueue::more(cqe.flags()) {
                        *wake_armed = false;
                    }
                }
                KIND_CANCEL => {}
                KIND_KICK => {
                    let Some(q) = queues.get_mut(slot).and_then(Option::as_mut) else {
                        log::error!("reactor{index}: kick completion for empty queue slot {slot}");
                        continue;
                    };
                    if res >= 0 {
                        q.pending = true;
                        q.handler.kicked(now);
                    } else if res != -libc::ECANCELED {
                        log::error!("reactor{index}: polling the kick eventfd of queue slot {slot} failed: {}", io::Error::from_raw_os_error(-res));
                        q.kick_dead = true;
                    }
                    if !cqueue::more(cqe.flags()) {
                        q.kick_armed = false;
                    }
                }
                _ => {
                    debug_assert_eq!(kind, KIND_IO);
                    completed += 1;
                    let Some(q) = queues.get_mut(slot).and_then(Option::as_mut) else {
                        log::error!("reactor{index}: I/O completion for empty queue slot {slot}");
                        continue;
                    };
                    q.completed = true;
                    q.handler.complete(
                        &mut RingCtx {
                            sq: &mut sq,
                            submitter: &submitter,
                            bufs,
                            slot,
                            now,
                            #[cfg(any(test, feature = "fuzz"))]
                            record: None,
                        },
                        tag,
                        res,
                    );
                }
            }
        }
        drop(cq);
        for q in queues.iter_mut().flatten() {
            q.handler.publish();
        }
        sq.sync();
        Ok(completed)
    }
}

/// Turns guest notifications on for every polling queue before the reactor waits for
/// in-flight I/O (each queue's next turn turns them off again); returns true when a queue
/// has new requests already, so the reactor must not sleep.
fn notify_for_wait(queues: &mut [Option<QueueSlot>]) -> bool {
    let mut arrived = false;
    for q in queues.iter_mut().flatten() {
        if q.polling && !q.draining && !q.notify_in_wait {
            q.notify_in_wait = true;
            if q.handler.set_notify(true) {
                q.pending = true;
                arrived = true;
            }
        }
    }
    arrived
}

/// A moving average that gives each new sample 1/8 of the weight.
fn ewma(avg: u64, sample: u64) -> u64 {
    avg - avg / 8 + sample / 8
}
