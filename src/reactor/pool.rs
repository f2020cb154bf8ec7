//! The pool of reactor threads and the handle devices use to reach them.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::{Command, Reactor};
use super::{HandlerFactory, ReactorError, ReactorOptions, CONTROL_TIMEOUT};
use crate::metrics::Report;
use crate::vmm::exit::{ExitHandle, ExitReason};
use crate::vmm::thread;

struct Link {
    tx: Sender<Command>,
    wake: EventFd,
}

struct Inner {
    links: Vec<Link>,
    started: Instant,
}

/// A cheap, cloneable way for devices to send messages to the reactors. Holds no thread.
#[derive(Clone)]
pub struct PoolHandle(Arc<Inner>);

impl PoolHandle {
    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.0.links.len()
    }

    /// True when the pool has no reactor (never, for a started pool).
    pub fn is_empty(&self) -> bool {
        self.0.links.is_empty()
    }

    fn send(&self, index: usize, cmd: Command) -> Result<(), ReactorError> {
        let link = self.0.links.get(index).ok_or(ReactorError::NoSuchReactor {
            index,
            len: self.len(),
        })?;
        link.tx
            .send(cmd)
            .map_err(|_| ReactorError::Gone { index })?;
        link.wake.write(1).map_err(|_| ReactorError::Gone { index })
    }

    fn wait<T>(index: usize, rx: Receiver<T>) -> Result<T, ReactorError> {
        rx.recv_timeout(CONTROL_TIMEOUT).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => ReactorError::Timeout {
                index,
                timeout_ms: CONTROL_TIMEOUT.as_millis(),
            },
            mpsc::RecvTimeoutError::Disconnected => ReactorError::Gone { index },
        })
    }

    /// Hands a queue to reactor `index`: `factory` runs on the reactor thread. `device` groups
    /// the queues that [`detach`](Self::detach) later removes together.
    pub fn attach(
        &self,
        index: usize,
        device: u64,
        factory: HandlerFactory,
    ) -> Result<(), ReactorError> {
        let (ack, rx) = mpsc::sync_channel(1);
        self.send(
            index,
            Command::Attach {
                device,
                factory,
                ack,
            },
        )?;
        Self::wait(index, rx)?.map_err(|message| ReactorError::Attach { index, message })
    }

    /// Removes every queue of `device` from reactor `index`: the reactor stops popping, waits
    /// for the requests in flight, publishes them and drops the queues. Returns once the
    /// reactor no longer touches the device's guest memory (or after [`CONTROL_TIMEOUT`]).
    pub fn detach(&self, index: usize, device: u64) -> Result<(), ReactorError> {
        let (ack, rx) = mpsc::sync_channel(1);
        self.send(index, Command::Detach { device, ack })?;
        Self::wait(index, rx)
    }

    /// Metrics of all reactors, merged.
    pub fn snapshot(&self) -> Result<Report, ReactorError> {
        let mut rxs = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            let (ack, rx) = mpsc::sync_channel(1);
            self.send(i, Command::Snapshot { ack })?;
            rxs.push(rx);
        }
        let mut report = Report::default();
        for (i, rx) in rxs.into_iter().enumerate() {
            report.merge(Self::wait(i, rx)?);
        }
        report.elapsed = self.0.started.elapsed();
        Ok(report)
    }
}

/// The reactor threads. Dropping the pool without [`stop`](Self::stop) lets the threads drain
/// and exit on their own.
pub struct ReactorPool {
    handle: PoolHandle,
    threads: Vec<JoinHandle<Option<()>>>,
}

impl ReactorPool {
    /// Starts one pinned reactor thread per core in `opts.cores`, named `reactor0`, `reactor1`, …
    /// Fails if any ring cannot be set up (the error says which and why).
    pub fn start(opts: ReactorOptions, exit: ExitHandle) -> Result<ReactorPool, ReactorError> {
        if opts.cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        let mut links = Vec::with_capacity(opts.cores.len());
        let mut threads = Vec::with_capacity(opts.cores.len());
        let mut ready = Vec::with_capacity(opts.cores.len());
        for (index, &core) in opts.cores.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let wake = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| ReactorError::EventFd { index, source })?;
            let wake_reactor = wake
                .try_clone()
                .map_err(|source| ReactorError::EventFd { index, source })?;
            let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
            let o = opts.clone();
            let ex = exit.clone();
            let t = thread::spawn(
                &format!("reactor{index}"),
                Some(core),
                exit.clone(),
                move || reactor_main(index, core, &o, rx, wake_reactor, ready_tx, ex),
            )
            .map_err(|source| ReactorError::Spawn { index, source })?;
            links.push(Link { tx, wake });
            threads.push(t);
            ready.push(ready_rx);
        }
        let pool = ReactorPool {
            handle: PoolHandle(Arc::new(Inner {
                links,
                started: Instant::now(),
            })),
            threads,
        };
        for (index, rx) in ready.into_iter().enumerate() {
            match PoolHandle::wait(index, rx) {
                Ok(Ok(())) => {}
                Ok(Err(source)) => return Err(ReactorError::Ring { index, source }),
                Err(e) => return Err(e),
            }
        }
        Ok(pool)
    }

    /// A handle for devices.
    pub fn handle(&self) -> PoolHandle {
        self.handle.clone()
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handle.len()
    }

    /// True when the pool has no reactor.
    pub fn is_empty(&self) -> bool {
        self.handle.is_empty()
    }

    /// Metrics of all reactors, merged (e.g. on SIGUSR1).
    pub fn snapshot(&self) -> Result<Report, ReactorError> {
        self.handle.snapshot()
    }

    /// Stops every reactor after its queues drained, joins the threads and returns the final
    /// metrics. A reactor that does not answer within [`CONTROL_TIMEOUT`] is left behind with
    /// a logged error and its metrics are missing from the report.
    pub fn stop(mut self) -> Result<Report, ReactorError> {
        let threads = std::mem::take(&mut self.threads);
        let mut rxs = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            let (ack, rx): (SyncSender<Report>, _) = mpsc::sync_channel(1);
            match self.handle.send(i, Command::Stop { ack }) {
                Ok(()) => rxs.push(Some(rx)),
                Err(e) => {
                    log::error!("{e}");
                    rxs.push(None);
                }
            }
        }
        let mut report = Report::default();
        for ((i, rx), t) in rxs.into_iter().enumerate().zip(threads) {
            let Some(rx) = rx else { continue };
            match PoolHandle::wait(i, rx) {
                Ok(r) => {
                    report.merge(r);
                    let _ = t.join();
                }
                Err(e) => log::error!("Stopping the reactors: {e}"),
            }
        }
        report.elapsed = self.handle.0.started.elapsed();
        Ok(report)
    }
}

impl Drop for ReactorPool {
    /// Without [`stop`](Self::stop): asks every reactor to drain and exit, without waiting.
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        for i in 0..self.len() {
            let (ack, _rx) = mpsc::sync_channel(1);
            let _ = self.handle.send(i, Command::Stop { ack });
        }
    }
}

fn reactor_main(
    index: usize,
    core: usize,
    opts: &ReactorOptions,
    rx: Receiver<Command>,
    wake: EventFd,
    ready: SyncSender<std::io::Result<()>>,
    exit: ExitHandle,
) {
    let reactor = match Reactor::new(index, core, opts, rx, wake) {
        Ok(r) => {
            let _ = ready.send(Ok(()));
            r
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Err(e) = reactor.run() {
        log::error!("reactor{index}: io_uring failed: {e}");
        exit.request(ExitReason::DeviceError {
            message: format!("reactor{index}: io_uring failed: {e}"),
        });
    }
}
