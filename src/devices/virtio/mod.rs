//! Virtio devices and their PCI transport.
//!
//! The transport ([`pci`]) owns the guest-visible registers; a device model implements
//! [`VirtioDevice`]. When the driver sets DRIVER_OK the transport hands the device its
//! configured queues as [`ActiveQueue`]s: each carries the queue, the ioeventfd the guest
//! kicks and the irqfd that raises the queue's MSI-X vector. From then on the device's
//! queues are served by reactor threads and the vCPU threads never touch them again.

pub mod block;
pub mod net;
pub mod pci;

use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Virtio device ids (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// Feature bits common to all devices (virtio 1.2, 6).
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// A queue the driver has configured and enabled, handed to the device at DRIVER_OK.
pub struct ActiveQueue {
    /// Index of the queue within the device.
    pub index: u16,
    /// The queue: size, ring addresses and event_idx already set, `ready` true.
    pub queue: virtio_queue::Queue,
    /// Becomes readable when the guest kicks this queue (a KVM ioeventfd).
    pub kick: EventFd,
    /// Writing 1 raises the queue's MSI-X interrupt (a KVM irqfd); `None` when the driver
    /// chose VIRTIO_MSI_NO_VECTOR, i.e. it polls and wants no interrupts at all.
    pub irq: Option<EventFd>,
}

/// Errors a device returns from [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("Device expects {expected} queues, the driver enabled {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("Failed to hand the queues to the reactors: {0}")]
    Reactor(String),
    #[error("Failed to activate the device")]
    Io(#[source] std::io::Error),
}

/// What the virtio-pci transport needs from a device model.
pub trait VirtioDevice: Send {
    /// Virtio device id (`TYPE_BLOCK`, `TYPE_NET`).
    fn device_type(&self) -> u32;
    /// Number of queues the device exposes.
    fn num_queues(&self) -> usize;
    /// Largest queue size the driver may choose.
    fn queue_max_size(&self) -> u16;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` with the features the driver acknowledged.
    fn activate(
        &mut self,
        mem: GuestMemory,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops serving all queues. Returns once no thread touches guest memory for this
    /// device any more, so the driver may reuse the rings.
    fn reset(&mut self);
    /// True once the device hit an error that needs a reset (DEVICE_NEEDS_RESET).
    fn needs_reset(&self) -> bool {
        false
    }
}
