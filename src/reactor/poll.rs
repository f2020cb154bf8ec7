//! How a queue is polled: the adaptive busy-poll window (QEMU's poll-grow/poll-shrink, per
//! queue), one queue's share of a pass, and the in-flight policy a pass follows.

use std::time::{Duration, Instant};

use super::event_loop::{QueueSlot, RingCtx};
use super::{InFlightPolicy, BATCH_MAX, FAST_SERVICE};

/// What a queue wants after its part of a pass.
pub(super) enum QueueState {
    /// Notifications are on; a kick or a completion wakes it.
    Idle,
    /// More requests wait than one batch took: come back without waiting.
    More,
    /// Busy-polling the avail ring with notifications off (until `QueueSlot::poll_until`).
    Poll,
}

/// Longest a queue keeps polling while its I/O is in flight with no pop or completion.
const IN_FLIGHT_POLL_MAX: Duration = Duration::from_millis(1);

/// Smallest window a queue grows to from zero, and the step below which it drops to zero.
const POLL_MIN: Duration = Duration::from_micros(2);

/// A kick this many poll windows after a queue went to sleep still grows its window. The
/// gap is measured when the reactor sees the kick, so it includes the kick's own delivery
/// (the guest's exit, the eventfd, the reactor's wake-up: about 30 µs on the lab's nested
/// host, a few µs on bare metal); comparing it with the window alone would leave a window
/// that once reached zero there forever.
const GROW_GAP_WINDOWS: u32 = 4;

/// Adapts a queue's poll window once it slept and was kicked `gap` later (QEMU's
/// poll-grow/poll-shrink rule, per queue): a kick soon after going to sleep (within
/// [`GROW_GAP_WINDOWS`] × `max`) would have been caught by polling longer, so the window
/// doubles; a longer gap means polling would not have paid, so it halves, down to zero: an
/// idle or slow guest costs no reactor CPU. Returns the new window.
fn adapt(window: Duration, max: Duration, gap: Duration) -> Duration {
    if gap <= max * GROW_GAP_WINDOWS {
        (window * 2).max(POLL_MIN).min(max)
    } else {
        let w = window / 2;
        if w < POLL_MIN {
            Duration::ZERO
        } else {
            w
        }
    }
}

/// Pops one bounded batch from `q` if it may have work, and says how the queue wants to be
/// served next.
pub(super) fn run_queue(
    q: &mut QueueSlot,
    ctx: &mut RingCtx<'_, '_>,
    adaptive: bool,
) -> QueueState {
    // A completion wakes a sleeping queue too: the guest is about to answer it.
    if !q.pending && !q.polling && !q.completed {
        return QueueState::Idle;
    }
    let now = ctx.now;
    let kicked = q.pending;
    q.pending = false;
    let max = q.poll_max;
    if let Some(slept) = q.slept_at.take() {
        // Only a kick tells how soon the guest came back; a completion says nothing of it.
        if kicked && adaptive {
            q.window = adapt(q.window, max, now.saturating_duration_since(slept));
        }
    }
    if !q.polling {
        q.handler.set_notify(false);
    }
    let n = q.handler.poll_avail(ctx, BATCH_MAX);
    if q.polling && n > 0 && !kicked {
        q.handler.poll_hit();
    }
    let window = if adaptive { q.window } else { max };
    if n >= BATCH_MAX {
        q.pending = true;
        if !window.is_zero() {
            q.polling = true;
            q.poll_until = now + window;
        }
        return QueueState::More;
    }
    if !window.is_zero() {
        // A queue with I/O in flight stays in its window: the guest answers completions
        // with new requests (and with several queues on one core a batch can take longer
        // than the window to complete), but not for longer than IN_FLIGHT_POLL_MAX since
        // its last pop or completion: I/O that stays out that long (a slow disk, a flush)
        // lets the queue sleep, and its completion wakes the reactor.
        let completed = std::mem::take(&mut q.completed);
        if n > 0 || completed {
            q.last_activity = now;
        }
        let waiting = q.handler.io_in_flight() > 0
            && now.saturating_duration_since(q.last_activity) < IN_FLIGHT_POLL_MAX;
        if n > 0 || completed || waiting {
            q.polling = true;
            q.poll_until = now + window;
            return QueueState::Poll;
        }
        if q.polling && now < q.poll_until {
            return QueueState::Poll;
        }
    }
    q.polling = false;
    if q.handler.set_notify(true) {
        q.pending = true;
        return QueueState::More;
    }
    if !max.is_zero() {
        q.slept_at = Some(now);
    }
    QueueState::Idle
}

/// Sets `q`'s poll-window maximum (unless the queue never polls) and keeps its adaptive
/// window within it; a raised maximum is grown into by the adaptive rule, as after start.
pub(super) fn set_poll_max(q: &mut QueueSlot, max: Duration) -> bool {
    if !q.handler.may_poll() {
        return false;
    }
    q.poll_max = max;
    q.window = q.window.min(max);
    if max.is_zero() {
        // Stop at the end of the current poll: the next pass re-enables notifications.
        q.poll_until = q.poll_until.min(Instant::now());
    }
    true
}

/// The in-flight policy for this pass: `Hybrid` resolves to `Wait` for a lone request
/// while requests have been coming back within [`FAST_SERVICE`], else to `Yield`.
pub(super) fn choose_in_flight(
    policy: InFlightPolicy,
    in_flight: usize,
    service: Duration,
) -> InFlightPolicy {
    match policy {
        InFlightPolicy::Hybrid if in_flight == 1 && service < FAST_SERVICE => InFlightPolicy::Wait,
        InFlightPolicy::Hybrid => InFlightPolicy::Yield,
        p => p,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::os::fd::{AsRawFd, RawFd};
    use std::rc::Rc;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::metrics::QueueRecorder;
    use crate::reactor::QueueHandler;

    /// What the fake queue has: requests to pop and I/O in flight; what it saw: the
    /// notification state.
    #[derive(Default)]
    struct Fake {
        avail: Cell<usize>,
        in_flight: Cell<usize>,
        notify: Cell<bool>,
    }

    struct FakeQueue {
        kick: EventFd,
        s: Rc<Fake>,
        metrics: QueueRecorder,
    }

    impl QueueHandler for FakeQueue {
        fn kick_fd(&self) -> RawFd {
            self.kick.as_raw_fd()
        }
        fn file_fd(&self) -> Option<RawFd> {
            None
        }
        fn poll_window(&self) -> Option<Duration> {
            Some(MAX)
        }
        fn kicked(&mut self, _: Instant) {}
        fn set_notify(&mut self, enable: bool) -> bool {
            self.s.notify.set(enable);
            false
        }
        fn poll_avail(&mut self, _: &mut RingCtx<'_, '_>, budget: usize) -> usize {
            let n = self.s.avail.get().min(budget);
            self.s.avail.set(self.s.avail.get() - n);
            self.s.in_flight.set(self.s.in_flight.get() + n);
            n
        }
        fn poll_hit(&mut self) {}
        fn complete(&mut self, _: &mut RingCtx<'_, '_>, _: u32, _: i32) {}
        fn publish(&mut self) {}
        fn in_flight(&self) -> usize {
            self.s.in_flight.get()
        }
        fn io_in_flight(&self) -> usize {
            self.s.in_flight.get()
        }
        fn metrics(&self) -> &QueueRecorder {
            &self.metrics
        }
        fn metrics_mut(&mut self) -> &mut QueueRecorder {
            &mut self.metrics
        }
    }

    /// Runs `run_queue` on `q` at `now`.
    fn turn(q: &mut QueueSlot, now: Instant) -> QueueState {
        let mut ring = io_uring::IoUring::new(8).unwrap();
        let (submitter, mut sq, _) = ring.split();
        let mut bufs = super::super::buffers::FixedBuffers::default();
        run_queue(
            q,
            &mut RingCtx::for_test(&mut sq, &submitter, &mut bufs, now),
            true,
        )
    }

    fn fake() -> (QueueSlot, Rc<Fake>) {
        let s = Rc::new(Fake::default());
        let h = FakeQueue {
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            s: s.clone(),
            metrics: QueueRecorder::new("fake", 0, 0),
        };
        (QueueSlot::new(0, Box::new(h), false), s)
    }

    #[test]
    fn test_run_queue_idle_queue_polls_its_window_then_sleeps() {
        let (mut q, s) = fake();
        let t = Instant::now();
        s.avail.set(1);
        assert!(matches!(turn(&mut q, t), QueueState::Poll));
        assert!(!s.notify.get(), "notifications are off while polling");
        s.in_flight.set(0);
        assert!(matches!(turn(&mut q, t + MAX / 2), QueueState::Poll));
        assert!(matches!(turn(&mut q, t + MAX * 2), QueueState::Idle));
        assert!(s.notify.get(), "a sleeping queue has notifications on");
        assert!(q.slept_at.is_some());
    }

    #[test]
    fn test_run_queue_in_flight_io_keeps_polling_until_cap_then_sleeps() {
        let (mut q, s) = fake();
        let t = Instant::now();
        s.avail.set(4);
        assert!(matches!(turn(&mut q, t), QueueState::Poll));
        // Far past the window, the I/O is still out: keep polling (no kick needed for the
        // guest's answer to its completion)...
        assert!(matches!(turn(&mut q, t + MAX * 8), QueueState::Poll));
        // ...but not past the cap: then sleep, and let the completion wake the queue.
        let late = t + IN_FLIGHT_POLL_MAX + MAX * 2;
        assert!(matches!(turn(&mut q, late), QueueState::Idle));
        assert!(s.notify.get());
        s.in_flight.set(0);
        q.completed = true;
        assert!(matches!(turn(&mut q, late + MAX), QueueState::Poll));
        assert!(!s.notify.get(), "a completion turns polling back on");
    }

    #[test]
    fn test_run_queue_kick_soon_after_sleep_grows_window_late_kick_shrinks() {
        let (mut q, s) = fake();
        let t = Instant::now();
        q.window = Duration::from_micros(8);
        q.slept_at = Some(t);
        q.pending = true;
        s.avail.set(1);
        turn(&mut q, t + Duration::from_micros(20));
        assert_eq!(q.window, Duration::from_micros(16));
        q.slept_at = Some(t);
        q.pending = true;
        turn(&mut q, t + Duration::from_millis(5));
        assert_eq!(q.window, Duration::from_micros(8));
    }

    #[test]
    fn test_choose_in_flight_lone_fast_request_waits_else_yields() {
        let fast = Duration::from_micros(3);
        let slow = Duration::from_micros(60);
        let h = InFlightPolicy::Hybrid;
        assert_eq!(choose_in_flight(h, 1, fast), InFlightPolicy::Wait);
        assert_eq!(choose_in_flight(h, 1, slow), InFlightPolicy::Yield);
        assert_eq!(choose_in_flight(h, 32, fast), InFlightPolicy::Yield);
        assert_eq!(
            choose_in_flight(InFlightPolicy::Spin, 1, fast),
            InFlightPolicy::Spin
        );
    }

    const MAX: Duration = Duration::from_micros(32);

    #[test]
    fn test_adapt_kick_soon_after_sleep_grows_to_max() {
        let mut w = Duration::ZERO;
        for _ in 0..10 {
            w = adapt(w, MAX, Duration::from_micros(40));
        }
        assert_eq!(w, MAX);
        assert_eq!(
            adapt(Duration::ZERO, MAX, Duration::from_micros(1)),
            POLL_MIN
        );
    }

    #[test]
    fn test_adapt_long_gaps_shrink_to_zero() {
        let mut w = MAX;
        let mut steps = 0;
        while !w.is_zero() {
            w = adapt(w, MAX, Duration::from_millis(1));
            steps += 1;
            assert!(steps < 10, "window never reached zero");
        }
        assert_eq!(
            adapt(Duration::ZERO, MAX, Duration::from_millis(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn test_adapt_zero_max_never_polls() {
        assert_eq!(
            adapt(Duration::ZERO, Duration::ZERO, Duration::ZERO),
            Duration::ZERO
        );
    }
}
