//! virtio-net on a tap: options and config space ([`config`]), the pure chain parser
//! ([`frame`]), the tap back end ([`tap`]) and per-queue handlers on the reactors ([`rx`],
//! [`tx`], [`ctrl`]: the net halves of queues whose other half is the shared
//! [`queue core`](crate::devices::virtio::queue); [`handler`] holds what the three share).
//!
//! ```ignore
//! let dev = NetDevice::new(&"tap=tap0,queues=2".parse()?, &pool)?;
//! // the transport calls VirtioDevice::{features, read_config, activate, reset}
//! ```
//!
//! Queues are laid out as the spec says: rx0, tx0, rx1, tx1, …, then the control queue
//! (index 2 × pairs with MQ, 2 without). Both queues of a pair go to the same reactor,
//! which registers the pair's tap file in its fixed-file table. Metrics use the block
//! counters with these meanings: `reads`/`bytes_read` are frames and payload bytes received
//! by the guest (RX), `writes`/`bytes_written` frames and bytes sent (TX) or control commands
//! acknowledged (ctrl), `errors` every dropped chain or frame, `unsupported` control commands
//! answered with VIRTIO_NET_ERR; `kick_to_complete` is TX kick to used entry, `service` is
//! pop to completion (on RX: how long a posted buffer waited for a frame).

pub mod config;
pub mod ctrl;
pub mod frame;
pub mod handler;
pub mod pairs;
pub mod rx;
pub mod tap;
pub mod tx;

pub use config::{NetConfig, NetConfigError};
pub use tap::{Tap, TapError};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use config::{features as f, CONFIG_LEN};
use handler::NetQueueParts;
use pairs::{ActivePairs, PairGate};

use super::queue::QueueParts;
use super::{
    ActivateError, ActiveQueue, GuestMemory, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_NET,
};
use crate::metrics::QueueRecorder;
use crate::reactor::{DeviceKindOrdinal, PoolHandle, ReactorPool};

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Failed to open or configure the tap")]
    Tap(#[from] TapError),
    #[error("Net option reactors= names reactor {index}, but the pool has {len}")]
    NoSuchReactor { index: usize, len: usize },
}

/// A virtio-net device backed by a tap.
pub struct NetDevice {
    name: String,
    /// The pool key all the device's queues are attached under.
    key: u64,
    cfg: NetConfig,
    tap: Tap,
    config: [u8; CONFIG_LEN],
    features: u64,
    pool: PoolHandle,
    /// Reactor index per queue pair; the control queue goes with pair 0.
    placement: Vec<usize>,
    active: Vec<usize>,
    stops: Vec<EventFd>,
    /// Pairs in use (VQ_PAIRS_SET) and the tap queues that follow them.
    pairs: Arc<ActivePairs>,
    needs_reset: Arc<AtomicBool>,
    /// The tap's MTU, read at start-up (the vCPU threads that activate the device may not
    /// open sockets under seccomp): an MTU raised later sees larger frames dropped.
    tap_mtu: u32,
    /// The largest frame the tap delivers with the offloads set at activation
    /// ([`rx_frame_max`]): RX reads are sized for it.
    rx_frame_max: u32,
}

/// The segmentation offloads to the guest and the tap flags they need (offered unless
/// `rx-gso=off`, and set on the tap when acknowledged: [`tap_offloads`]).
const GSO_OFFLOADS: [(u32, u64); 4] = [
    (tap::TUN_F_TSO4, f::GUEST_TSO4),
    (tap::TUN_F_TSO6, f::GUEST_TSO6),
    (tap::TUN_F_TSO_ECN, f::GUEST_ECN),
    (tap::TUN_F_UFO, f::GUEST_UFO),
];

/// Maps the guest's acknowledged receive offloads to `TUN_F_*` flags. GSO frames need up to
/// 64 KiB of buffers: with MRG_RXBUF a read spans as many of the guest's buffers as it takes
/// ([`rx`]); without it the driver is expected to post 64 KiB buffers (virtio 1.2,
/// 5.1.6.3.1), and smaller ones see large frames dropped (counted as `too_big`).
pub fn tap_offloads(acked: u64) -> u32 {
    if acked & f::GUEST_CSUM == 0 {
        return 0;
    }
    GSO_OFFLOADS
        .iter()
        .filter(|&&(_, feat)| acked & feat != 0)
        .fold(tap::TUN_F_CSUM, |t, &(flag, _)| t | flag)
}

/// The largest Ethernet frame a tap with these `TUN_F_*` offloads and this MTU delivers: a
/// 64 KiB GSO frame once TSO or UFO is on, else an MTU-sized one with a VLAN tag.
pub fn rx_frame_max(offloads: u32, mtu: u32) -> u32 {
    if offloads & (tap::TUN_F_TSO4 | tap::TUN_F_TSO6 | tap::TUN_F_UFO) != 0 {
        frame::FRAME_MAX
    } else {
        mtu.saturating_add(14 + 4).min(frame::FRAME_MAX)
    }
}

impl NetDevice {
    /// Opens (or creates) the tap and prepares the device; queues go to `pool`'s reactors.
    pub fn new(cfg: &NetConfig, pool: &ReactorPool) -> Result<NetDevice, NetError> {
        Self::with_handle(cfg, pool.handle())
    }

    /// Like [`new`](Self::new), with a pool handle.
    pub fn with_handle(cfg: &NetConfig, pool: PoolHandle) -> Result<NetDevice, NetError> {
        let list: Vec<usize> = cfg
            .reactors
            .clone()
            .unwrap_or_else(|| (0..pool.len()).collect());
        if let Some(&bad) = list.iter().find(|&&r| r >= pool.len()) {
            return Err(NetError::NoSuchReactor {
                index: bad,
                len: pool.len(),
            });
        }
        let tap = Tap::open(&cfg.tap, cfg.queues)?;
        if let Some(mtu) = cfg.mtu {
            tap.set_mtu(mtu)?;
        }
        let pairs = Arc::new(ActivePairs::new(&tap)?);
        // `net0`, `net1`, … in the VM, and their default MACs; the reactors know a device's
        // queues by a key from the pool ([`PoolHandle::device_keys`]).
        let n = pool.ordinal(DeviceKindOrdinal::Net);
        let offset = if cfg.reactors.is_none() {
            n as usize
        } else {
            0
        };
        let placement = (0..usize::from(cfg.queues))
            .map(|p| list[(p + offset) % list.len()])
            .collect();
        let mac = cfg
            .mac
            .unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(n as u8)]);
        let tap_mtu = tap.mtu().unwrap_or_else(|| {
            log::warn!(
                "net{n}: cannot read the MTU of tap {}; RX reads sized for 1500",
                cfg.tap
            );
            1500
        });
        let sup = tap.supported_offloads();
        let mut features = F_VERSION_1
            | F_RING_EVENT_IDX
            | F_RING_INDIRECT_DESC
            | f::MAC
            | f::STATUS
            | f::MRG_RXBUF
            | f::CTRL_VQ
            | f::CTRL_RX
            | f::CSUM
            | f::HOST_TSO4
            | f::HOST_TSO6
            | f::HOST_ECN;
        if sup & tap::TUN_F_UFO != 0 {
            features |= f::HOST_UFO;
        }
        if sup & tap::TUN_F_CSUM != 0 {
            features |= f::GUEST_CSUM;
            let gso: &[(u32, u64)] = if cfg.rx_gso { &GSO_OFFLOADS } else { &[] };
            for &(flag, feat) in gso {
                if sup & flag != 0 {
                    features |= feat;
                }
            }
        }
        if cfg.queues > 1 {
            features |= f::MQ;
        }
        if cfg.mtu.is_some() {
            features |= f::MTU;
        }
        Ok(NetDevice {
            name: format!("net{n}"),
            key: pool.device_keys(1).start,
            config: config::config_space(mac, cfg.queues, cfg.mtu.unwrap_or(0)),
            cfg: cfg.clone(),
            tap,
            features,
            pool,
            placement,
            active: Vec::new(),
            stops: Vec::new(),
            pairs,
            needs_reset: Arc::new(AtomicBool::new(false)),
            tap_mtu,
            rx_frame_max: rx::FRAME_MAX_MTU1500,
        })
    }

    /// The keys the reactors know the device's queues by: all of them share the device's
    /// id (`PoolHandle::set_poll_max`).
    pub fn pool_keys(&self) -> std::ops::Range<u64> {
        self.key..self.key + 1
    }

    /// Device name used in metrics and logs (`netN`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Reactor index serving each queue pair.
    pub fn placement(&self) -> &[usize] {
        &self.placement
    }

    /// Queue pairs the driver asked for with VQ_PAIRS_SET (1 until it does).
    pub fn active_pairs(&self) -> u16 {
        self.pairs.get()
    }

    /// Tap queues attached (those of the pairs in use once the device is active).
    pub fn attached_tap_queues(&self) -> u16 {
        self.pairs.attached()
    }

    fn attach_queue(
        &mut self,
        mem: &GuestMemory,
        acked: u64,
        q: ActiveQueue,
        ctrl: Option<u16>,
    ) -> Result<(), ActivateError> {
        let is_ctrl = ctrl == Some(q.index);
        let pair = if is_ctrl { 0 } else { usize::from(q.index / 2) };
        if pair >= self.tap.pairs() {
            return Err(ActivateError::QueueCount {
                expected: self.num_queues(),
                got: usize::from(q.index) + 1,
            });
        }
        let reactor = self.placement[pair];
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Io)?;
        let stop_dev = stop.try_clone().map_err(ActivateError::Io)?;
        let role = if is_ctrl {
            "ctrl".to_string()
        } else if q.index % 2 == 0 {
            format!("rx{pair}")
        } else {
            format!("tx{pair}")
        };
        let mut parts = NetQueueParts {
            queue: QueueParts {
                name: format!("{}-{role}", self.name),
                mem: mem.clone(),
                queue: q.queue,
                kick: q.kick,
                irq: q.irq,
                needs_reset: self.needs_reset.clone(),
                poll: (self.cfg.poll_us > 0 && !is_ctrl)
                    .then(|| Duration::from_micros(u64::from(self.cfg.poll_us))),
                metrics: QueueRecorder::new(&self.name, q.index, reactor),
                final_avail: None,
            },
            acked,
            tap_fd: (!is_ctrl).then(|| self.tap.fd(pair)),
            fixed: 0,
            stop,
        };
        let (max_pairs, pairs) = (self.cfg.queues, self.pairs.clone());
        let gate = PairGate::new(self.pairs.clone(), pair as u16);
        let rx = q.index % 2 == 0;
        let frame_max = self.rx_frame_max;
        if !self.active.contains(&reactor) {
            self.active.push(reactor);
        }
        self.stops.push(stop_dev);
        self.pool
            .attach(
                reactor,
                self.key,
                Box::new(move |ctx| {
                    parts.fixed = ctx.fixed_file;
                    let h: Box<dyn crate::reactor::QueueHandler> = if is_ctrl {
                        Box::new(ctrl::CtrlQueue::new(parts, max_pairs, pairs))
                    } else if rx {
                        Box::new(rx::RxQueue::new(parts).with_frame_max(frame_max))
                    } else {
                        Box::new(tx::TxQueue::new(parts).with_gate(gate))
                    };
                    Ok(h)
                }),
            )
            .map_err(ActivateError::Reactor)
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn num_queues(&self) -> usize {
        2 * usize::from(self.cfg.queues) + 1
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
        // The MAC is writable only in legacy devices; everything is read-only here.
        log::debug!(
            "{}: ignored config write of {} bytes at {offset}",
            self.name,
            data.len()
        );
    }

    /// Sets the tap's offloads from the acknowledged features and hands each enabled queue to
    /// its pair's reactor.
    fn activate(
        &mut self,
        mem: GuestMemory,
        acked: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let expected = self.num_queues();
        let ctrl = (acked & f::CTRL_VQ != 0).then(|| {
            if acked & f::MQ != 0 {
                2 * self.cfg.queues
            } else {
                2
            }
        });
        super::check_queue_indices(&queues, expected)?;
        let offloads = tap_offloads(acked);
        self.tap
            .set_offloads(offloads)
            .map_err(ActivateError::Tap)?;
        self.rx_frame_max = rx_frame_max(offloads, self.tap_mtu);
        // Pair 0 until the driver sets more (without MQ, for good): the other tap queues
        // are detached so that no flow lands where nobody reads.
        self.pairs.set(1).map_err(ActivateError::Tap)?;
        self.needs_reset.store(false, Ordering::Release);
        for q in queues {
            if let Err(e) = self.attach_queue(&mem, acked, q, ctrl) {
                self.reset();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Cancels the posted reads, then blocks until every reactor serving this device has
    /// dropped its queues (or [`crate::reactor::CONTROL_TIMEOUT`] passed, logged as an error).
    fn reset(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.write(1);
        }
        for r in std::mem::take(&mut self.active) {
            if let Err(e) = self.pool.detach(r, self.key) {
                log::error!("{}: reset: {e}", self.name);
            }
        }
        if let Err(e) = self.pairs.set(1) {
            log::warn!("{}: reset: {}", self.name, crate::error::error_chain(&e));
        }
        self.needs_reset.store(false, Ordering::Release);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
