//! virtio-blk: config ([`config`]), pure request parser ([`request`]), the block half of a
//! queue on the reactors ([`handler`], joined with the shared
//! [`queue core`](crate::devices::virtio::queue)), back ends and their fallbacks ([`backend`]).
//!
//! ```ignore
//! let pool = reactor::ReactorPool::start(reactor::ReactorOptions { cores: vec![1], ..Default::default() }, exit.clone())?;
//! let dev = BlockDevice::new(&"path=disk.img,queues=2".parse()?, &pool)?;
//! // the transport calls VirtioDevice::{features, read_config, activate, reset}
//! ```
//!
//! `activate` sends each queue to its reactor (round-robin over the pool, or over the disk's
//! `reactors=` list) and waits for the reactor to accept it; `reset` asks the reactors to
//! drain and drop the device's queues and returns once they no longer touch guest memory.
//!
//! Data path, per queue and reactor pass: read the avail index once, walk at most
//! [`crate::reactor::BATCH_MAX`] chains through host pointers ([`Chain`](crate::devices::virtio::queue::Chain)), parse
//! each into a slot indexed by its head (iovecs point into guest memory), queue one SQE per
//! request on the reactor's ring (readv/writev, fdatasync, fallocate), and on completion
//! write the status byte and the used element; the used index is stored once per batch and
//! the irqfd written at most once per batch, when EVENT_IDX (or NO_INTERRUPT) allows.
//!
//! O_DIRECT disks keep a buffered twin of the file: requests whose guest buffers are not
//! 512-byte aligned, or that O_DIRECT refuses with EINVAL, go through the page cache instead
//! of failing. Bad guest input completes with IOERR/UNSUPP (or used length 0 when the chain
//! has no status byte) and a rate-limited log line; ring corruption sets DEVICE_NEEDS_RESET.

pub mod backend;
pub mod config;
#[doc(hidden)]
#[cfg(any(test, feature = "test-util"))]
pub mod driver;
pub mod handler;
pub mod request;

pub use config::{BackendKind, DiskConfig, DiskConfigError, DiskInfo};

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backend::{Backend, BackendError};
use config::{features as f, CONFIG_LEN};
use handler::BlockQueue;

use super::queue::QueueParts;
use super::{
    ActivateError, ActiveQueue, GuestMemory, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_BLOCK,
};
use crate::metrics::QueueRecorder;
use crate::reactor::{DeviceKindOrdinal, PoolHandle, ReactorError, ReactorPool};

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("Failed to open the disk")]
    Backend(#[from] BackendError),
    #[error("Disk option reactors= names reactor {index}, but the pool has {len}")]
    NoSuchReactor { index: usize, len: usize },
}

/// A virtio-blk device.
pub struct BlockDevice {
    name: String,
    /// One pool key per queue (the queue's index is its offset), so one queue can be
    /// stopped alone (vhost-user's GET_VRING_BASE).
    keys: std::ops::Range<u64>,
    cfg: DiskConfig,
    backend: Arc<Backend>,
    disk: Arc<DiskInfo>,
    config: [u8; CONFIG_LEN],
    features: u64,
    pool: PoolHandle,
    /// Reactor index for each queue index.
    placement: Vec<usize>,
    /// Reactor and pool key of each queue being served.
    active: Vec<(usize, u64)>,
    needs_reset: Arc<AtomicBool>,
}

impl BlockDevice {
    /// Opens the disk and prepares the device; queues are placed on `pool`'s reactors.
    pub fn new(cfg: &DiskConfig, pool: &ReactorPool) -> Result<BlockDevice, BlockError> {
        Self::with_handle(cfg, pool.handle())
    }

    /// Like [`new`](Self::new), with a pool handle.
    pub fn with_handle(cfg: &DiskConfig, pool: PoolHandle) -> Result<BlockDevice, BlockError> {
        let backend = Backend::open(cfg)?;
        // Disks without `id=` are `blk0`, `blk1`, … in the VM; the reactors know the
        // queues by keys from the pool ([`PoolHandle::device_keys`]).
        let n = pool.ordinal(DeviceKindOrdinal::Block);
        let name = cfg.id.clone().unwrap_or_else(|| format!("blk{n}"));
        let list: Vec<usize> = cfg
            .reactors
            .clone()
            .unwrap_or_else(|| (0..pool.len()).collect());
        if let Some(&bad) = list.iter().find(|&&r| r >= pool.len()) {
            return Err(BlockError::NoSuchReactor {
                index: bad,
                len: pool.len(),
            });
        }
        // Spread the disks' first queues over the pool when placement is automatic.
        let offset = if cfg.reactors.is_none() {
            n as usize
        } else {
            0
        };
        let placement = (0..usize::from(cfg.queues))
            .map(|q| list[(q + offset) % list.len()])
            .collect();
        let readonly = cfg.readonly || matches!(&backend, Backend::Uring(u) if u.readonly);
        let disk = DiskInfo::new(backend.capacity_sectors(), readonly, cfg.queue_size, &name);
        let mut features = F_VERSION_1
            | F_RING_EVENT_IDX
            | F_RING_INDIRECT_DESC
            | f::SIZE_MAX
            | f::SEG_MAX
            | f::BLK_SIZE
            | f::TOPOLOGY
            | f::FLUSH
            | f::MQ;
        if readonly {
            features |= f::RO;
        } else {
            features |= f::DISCARD | f::WRITE_ZEROES;
        }
        Ok(BlockDevice {
            config: disk.config_space(cfg.queues),
            disk: Arc::new(disk),
            name,
            keys: pool.device_keys(u64::from(cfg.queues)),
            cfg: cfg.clone(),
            backend: Arc::new(backend),
            features,
            pool,
            placement,
            active: Vec::new(),
            needs_reset: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The keys the reactors know the device's queues by, one per queue
    /// (`PoolHandle::set_poll_max`).
    pub fn pool_keys(&self) -> std::ops::Range<u64> {
        self.keys.clone()
    }

    /// Device name used in metrics and logs (`id=` or `blkN`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    /// Reactor index serving each queue.
    pub fn placement(&self) -> &[usize] {
        &self.placement
    }

    /// Feature bits offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.features
    }

    /// The virtio-blk configuration space (capacity, seg_max, blk_size, num_queues, …).
    pub fn config_space(&self) -> &[u8; CONFIG_LEN] {
        &self.config
    }

    fn queue_key(&self, index: u16) -> u64 {
        self.keys.start + u64::from(index)
    }

    /// Starts serving one queue on its reactor (vhost-user starts and stops queues one by
    /// one). When the queue is later stopped, its next avail index is stored in
    /// `final_avail`. A queue with this index that is already served is stopped first.
    pub fn start_queue(
        &mut self,
        mem: &GuestMemory,
        q: ActiveQueue,
        final_avail: Arc<AtomicU32>,
    ) -> Result<(), ReactorError> {
        if usize::from(q.index) >= self.placement.len() {
            return Err(ReactorError::Attach {
                index: 0,
                message: format!(
                    "queue {} is beyond the disk's {}",
                    q.index,
                    self.placement.len()
                ),
            });
        }
        self.stop_queue(q.index);
        self.attach_queue(mem, q, Some(final_avail))
    }

    /// Stops one queue: returns once its requests in flight completed and were published and
    /// its reactor dropped it (or after [`crate::reactor::CONTROL_TIMEOUT`], logged).
    pub fn stop_queue(&mut self, index: u16) {
        let key = self.queue_key(index);
        let Some(at) = self.active.iter().position(|&(_, k)| k == key) else {
            return;
        };
        let q = self.active.swap_remove(at);
        self.detach(&[q]);
    }

    /// Detaches `queues` (reactor, key) with their drains overlapping.
    fn detach(&self, queues: &[(usize, u64)]) {
        for (r, &(reactor, _)) in self.pool.detach_many(queues).into_iter().zip(queues) {
            match r {
                Ok(()) => {}
                // A stopped reactor drained its queues before exiting.
                Err(ReactorError::Gone { .. }) => {
                    log::debug!("{}: reset after reactor{reactor} stopped", self.name)
                }
                Err(e) => log::error!("{}: reset: {e}", self.name),
            }
        }
    }

    fn attach_queue(
        &mut self,
        mem: &GuestMemory,
        q: ActiveQueue,
        final_avail: Option<Arc<AtomicU32>>,
    ) -> Result<(), ReactorError> {
        let reactor = self.placement[usize::from(q.index)];
        let key = self.queue_key(q.index);
        let parts = QueueParts {
            name: format!("{}-q{}", self.name, q.index),
            mem: mem.clone(),
            queue: q.queue,
            kick: q.kick,
            irq: q.irq,
            needs_reset: self.needs_reset.clone(),
            poll: (self.cfg.poll_us > 0)
                .then(|| Duration::from_micros(u64::from(self.cfg.poll_us))),
            metrics: QueueRecorder::new(&self.name, q.index, reactor),
            final_avail,
        };
        let backend = self.backend.clone();
        let disk = self.disk.clone();
        self.active.push((reactor, key));
        self.pool.attach(
            reactor,
            key,
            Box::new(move |ctx| {
                let io = backend.queue_io(ctx.fixed_file, ctx.alt_fixed_file);
                Ok(Box::new(BlockQueue::new(
                    parts,
                    disk,
                    io,
                    [backend.fd(), backend.alt_fd()],
                )))
            }),
        )
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.queues)
    }

    fn queue_max_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Everything is read-only without CONFIG_WCE, which we do not offer.
        log::debug!(
            "{}: ignored config write of {} bytes at {offset}",
            self.name,
            data.len()
        );
    }

    /// Hands each queue to its reactor. The driver may enable fewer queues than offered (Linux
    /// uses at most one per vCPU); each enabled queue keeps its index and placement.
    fn activate(
        &mut self,
        mem: GuestMemory,
        _acked_features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let expected = self.num_queues();
        super::check_queue_indices(&queues, expected)?;
        if !self.active.is_empty() {
            // Activated again without a reset: drop the old queues first.
            self.reset();
        }
        self.needs_reset.store(false, Ordering::Release);
        for q in queues {
            if let Err(e) = self.attach_queue(&mem, q, None) {
                self.reset();
                return Err(ActivateError::Reactor(e));
            }
        }
        Ok(())
    }

    /// Blocks until every reactor serving this device has finished the requests in flight and
    /// dropped the queues (or [`crate::reactor::CONTROL_TIMEOUT`] passed, logged as an error).
    fn reset(&mut self) {
        let active = std::mem::take(&mut self.active);
        self.detach(&active);
        self.needs_reset.store(false, Ordering::Release);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
