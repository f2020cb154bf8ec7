//! Control messages: how other threads reach a reactor (attach, detach, snapshot, poll
//! window, stop). They arrive on a channel with an eventfd wake-up polled through the ring,
//! and are handled at the start of the pass after the wake-up.

use std::ops::Range;
use std::sync::mpsc::{SyncSender, TryRecvError};
use std::time::Duration;

use super::snapshot;
use super::Reactor;
use crate::metrics::Report;
use crate::reactor::snapshot::Interval;
use crate::reactor::HandlerFactory;

/// Messages to a reactor.
pub(crate) enum Command {
    Attach {
        device: u64,
        factory: HandlerFactory,
        ack: SyncSender<Result<(), String>>,
    },
    Detach {
        device: u64,
        ack: SyncSender<()>,
    },
    /// Fill the buffer (empty recorders to swap in, see `snapshot.rs`) and send it back.
    Snapshot {
        buf: Box<Interval>,
        ack: SyncSender<Box<Interval>>,
    },
    /// Sets the poll-window maximum of every pollable queue whose key is in `keys` (one
    /// device's queues), now and for queues attached later; answers how many it changed.
    SetPollMax {
        keys: Range<u64>,
        max: Duration,
        ack: SyncSender<usize>,
    },
    Stop {
        ack: SyncSender<Report>,
    },
}

impl Reactor {
    pub(super) fn handle_commands(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Attach {
                    device,
                    factory,
                    ack,
                }) => {
                    let _ = ack.send(self.attach(device, factory));
                }
                Ok(Command::Detach { device, ack }) => {
                    self.begin_drain(Some(device));
                    self.detaches.push((device, ack));
                }
                Ok(Command::Snapshot { mut buf, ack }) => {
                    snapshot::fill(&mut buf, &mut self.queues, &mut self.retired, &self.metrics);
                    let _ = ack.send(buf);
                }
                Ok(Command::SetPollMax { keys, max, ack }) => {
                    let _ = ack.send(self.set_poll_max(keys, max));
                }
                Ok(Command::Stop { ack }) => {
                    self.begin_drain(None);
                    self.stopping = Some(ack);
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // The pool is gone without a stop: drain and exit quietly.
                    if self.stopping.is_none() {
                        self.begin_drain(None);
                        self.stopping = Some(std::sync::mpsc::sync_channel(1).0);
                    }
                    return;
                }
            }
        }
    }
}
