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
pub mod queue;

use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Virtio device ids (virtio 1.2, 5).
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

/// Feature bits common to all devices (virtio 1.2, 6), as masks.
pub const F_RING_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const F_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

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
    #[error("Failed to hand the queues to the reactors")]
    Reactor(#[source] crate::reactor::ReactorError),
    #[error("Failed to configure the tap for the driver's settings")]
    Tap(#[source] net::tap::TapError),
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

/// Copies `config[offset..]` into `data`; bytes past the end of `config` read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| config.get(o as usize))
            .copied()
            .unwrap_or(0);
    }
}

/// Checks that `queues` is a non-empty set of distinct indices below `expected` (a driver may
/// enable fewer queues than offered, e.g. one per vCPU).
pub fn check_queue_indices(queues: &[ActiveQueue], expected: usize) -> Result<(), ActivateError> {
    let mut seen = vec![false; expected];
    for q in queues {
        match seen.get_mut(usize::from(q.index)) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(ActivateError::QueueCount {
                    expected,
                    got: queues.len(),
                })
            }
        }
    }
    if queues.is_empty() {
        return Err(ActivateError::QueueCount { expected, got: 0 });
    }
    Ok(())
}

/// Splits a device option string `key=value,key,...` into pairs. Bare numbers after
/// `list_key=` continue its comma-separated list (`reactors=0,1,queues=2` gives
/// `("reactors", "0,1")`); a key given twice is an error naming it.
pub fn split_options<'a>(s: &'a str, list_key: &str) -> Result<Vec<(&'a str, String)>, String> {
    let mut out: Vec<(&'a str, String)> = Vec::new();
    let mut in_list = false;
    for tok in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, value) = match tok.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None if in_list && tok.chars().all(|c| c.is_ascii_digit()) => {
                if let Some((_, v)) = out.last_mut() {
                    v.push(',');
                    v.push_str(tok);
                }
                continue;
            }
            None => (tok, ""),
        };
        if out.iter().any(|(k, _)| *k == key) {
            return Err(key.to_string());
        }
        in_list = key == list_key;
        out.push((key, value.to_string()));
    }
    Ok(out)
}

/// Parses a list of indices separated by `,` or `:` (`0,1` or `0:1`); `None` if empty or
/// not all numbers.
pub fn parse_index_list(value: &str) -> Option<Vec<usize>> {
    let list: Option<Vec<usize>> = value
        .split([',', ':'])
        .map(|i| i.trim().parse().ok())
        .collect();
    list.filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_split_options_list_continuation_and_flags() {
        let o = split_options("path=a,reactors=0,1,readonly,queues=2", "reactors").unwrap();
        assert_eq!(
            o,
            vec![
                ("path", "a".to_string()),
                ("reactors", "0,1".to_string()),
                ("readonly", String::new()),
                ("queues", "2".to_string())
            ]
        );
    }

    #[test]
    fn test_parse_index_list_separators() {
        assert_eq!(parse_index_list("0,1:2"), Some(vec![0, 1, 2]));
        assert_eq!(parse_index_list(""), None);
        assert_eq!(parse_index_list("0,x"), None);
    }

    #[test]
    fn test_split_options_duplicate_key_named() {
        assert_eq!(
            split_options("queues=1,queues=2", "reactors").unwrap_err(),
            "queues"
        );
    }

    #[test]
    fn test_read_config_bytes_past_end_is_zero() {
        let mut d = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
