//! The queue pairs the driver uses (virtio 1.2, 5.1.6.5.5): pair 0 after activation, then
//! the count of its last accepted `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`. Only those pairs are
//! served:
//! - their tap queues stay attached and the others are detached (TUNSETQUEUE with
//!   IFF_DETACH_QUEUE), so the kernel steers no flow to a queue nobody reads and an unused
//!   RX queue never gets a frame;
//! - an unused pair's TX queue ignores its kicks ([`PairGate`]).
//!
//! The count changes on the control path only (the control queue's reactor, activation and
//! reset on a vCPU); the data path reads it with one atomic load per pass of a TX queue.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;

use super::tap::{Tap, TapError};

/// The pair count in force and the tap queues it governs.
#[derive(Debug)]
pub struct ActivePairs {
    count: AtomicU16,
    /// Pairs whose tap queue is attached: always a prefix `0..attached`.
    attached: AtomicU16,
    /// A duplicate of each pair's tap file (same queue), so handlers that outlive the device
    /// never touch a closed or reused descriptor. Empty: no tap (fuzzing), count only.
    files: Vec<OwnedFd>,
    tap: String,
    /// A refusal was logged: a guest repeating the command does not flood the log.
    refusal_logged: AtomicBool,
}

impl ActivePairs {
    /// Pair 0 in use; every tap queue still attached, as `Tap::open` left them.
    pub fn new(tap: &Tap) -> Result<ActivePairs, TapError> {
        let files = (0..tap.pairs())
            .map(|p| tap.dup_queue(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ActivePairs {
            count: AtomicU16::new(1),
            attached: AtomicU16::new(files.len() as u16),
            files,
            tap: tap.name().to_string(),
            refusal_logged: AtomicBool::new(false),
        })
    }

    /// Only the count, no tap queues to steer (the fuzz harness).
    pub fn without_tap() -> ActivePairs {
        ActivePairs {
            count: AtomicU16::new(1),
            attached: AtomicU16::new(0),
            files: Vec::new(),
            tap: String::new(),
            refusal_logged: AtomicBool::new(false),
        }
    }

    /// Pairs in use.
    pub fn get(&self) -> u16 {
        self.count.load(Ordering::Acquire)
    }

    /// Uses pairs `0..n`: attaches their tap queues, then detaches the rest. On an error the
    /// count is unchanged and the tap queues are as far as they got (each pair that is
    /// served keeps its queue attached: attaching happens before the count rises, detaching
    /// after it falls).
    pub fn set(&self, n: u16) -> Result<(), TapError> {
        let n = n.max(1);
        if !self.files.is_empty() {
            let want = n.min(self.files.len() as u16);
            let have = self.attached.load(Ordering::Acquire);
            for p in have..want {
                self.steer(p, true)?;
                self.attached.store(p + 1, Ordering::Release);
            }
            if want < have {
                self.count.store(n, Ordering::Release);
                for p in (want..have).rev() {
                    self.steer(p, false)?;
                    self.attached.store(p, Ordering::Release);
                }
                return Ok(());
            }
        }
        self.count.store(n, Ordering::Release);
        Ok(())
    }

    /// Logs the first time the tap refused to follow a new pair count (the guest's command
    /// is answered VIRTIO_NET_ERR every time).
    pub fn log_refusal(&self, e: &TapError) {
        if !self.refusal_logged.swap(true, Ordering::Relaxed) {
            log::error!(
                "{} (logged once; the driver's VQ_PAIRS_SET gets VIRTIO_NET_ERR)",
                crate::error::error_chain(e)
            );
        }
    }

    /// Tap queues attached (for tests and logs).
    pub fn attached(&self) -> u16 {
        self.attached.load(Ordering::Acquire)
    }

    fn steer(&self, pair: u16, attach: bool) -> Result<(), TapError> {
        super::tap::set_queue_attached(self.files[usize::from(pair)].as_raw_fd(), attach).map_err(
            |source: io::Error| TapError::Steer {
                name: self.tap.clone(),
                pair,
                attach,
                source,
            },
        )
    }
}

/// What a data queue of pair `pair` checks before serving.
#[derive(Debug, Clone)]
pub struct PairGate {
    pairs: Arc<ActivePairs>,
    pair: u16,
}

impl PairGate {
    pub fn new(pairs: Arc<ActivePairs>, pair: u16) -> Self {
        PairGate { pairs, pair }
    }

    /// True while the driver uses this queue's pair.
    pub fn open(&self) -> bool {
        self.pair < self.pairs.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pairs_without_tap_counts_and_gates() {
        let pairs = Arc::new(ActivePairs::without_tap());
        let gates: Vec<PairGate> = (0..3).map(|p| PairGate::new(pairs.clone(), p)).collect();
        let open = |g: &[PairGate]| g.iter().map(PairGate::open).collect::<Vec<_>>();
        assert_eq!(
            open(&gates),
            vec![true, false, false],
            "pair 0 only at start"
        );
        pairs.set(3).unwrap();
        assert_eq!(open(&gates), vec![true, true, true]);
        pairs.set(2).unwrap();
        assert_eq!(open(&gates), vec![true, true, false]);
        pairs.set(0).unwrap();
        assert_eq!(
            open(&gates),
            vec![true, false, false],
            "pair 0 is never closed"
        );
    }
}
