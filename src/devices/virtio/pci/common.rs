//! The common configuration structure (virtio 1.2, 4.1.4.3) of the virtio-pci transport:
//! its register image, the driver's writes to it, and the device status state machine
//! (FEATURES_OK negotiation, DRIVER_OK activation, reset).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{
    QueueRegs, VirtioPci, COMMON_SIZE, NO_VECTOR, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::devices::virtio::{ActivateError, ActiveQueue, F_VERSION_1};

/// Why DRIVER_OK could not start the device: logged, and the device then reports
/// DEVICE_NEEDS_RESET (a driver's mistake never stops the VMM).
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("Queue {queue}: invalid {what} {value:#x}")]
    Queue {
        queue: usize,
        what: &'static str,
        value: u64,
        #[source]
        source: virtio_queue::Error,
    },
    #[error(
        "Queue {queue}: rings at {desc:#x}/{driver:#x}/{device:#x} are not inside guest memory"
    )]
    OutsideMemory {
        queue: usize,
        desc: u64,
        driver: u64,
        device: u64,
    },
    #[error("Failed to duplicate a queue's eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("DRIVER_OK with no queue enabled")]
    NoQueue,
    #[error("The device refused activation")]
    Device(#[source] ActivateError),
}

impl VirtioPci {
    fn status(&self) -> u8 {
        let needs_reset = if self.active && self.device.needs_reset() {
            STATUS_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    fn common_image(&self) -> [u8; COMMON_SIZE as usize] {
        let mut c = [0u8; COMMON_SIZE as usize];
        let features = self.device.features() | F_VERSION_1;
        let dfeat = match self.device_features_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let gfeat = match self.driver_features_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        c[0x00..0x04].copy_from_slice(&self.device_features_select.to_le_bytes());
        c[0x04..0x08].copy_from_slice(&dfeat.to_le_bytes());
        c[0x08..0x0c].copy_from_slice(&self.driver_features_select.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&gfeat.to_le_bytes());
        c[0x10..0x12].copy_from_slice(&self.config_vector.to_le_bytes());
        c[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        c[0x14] = self.status();
        c[0x15] = self.config_generation;
        c[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(self.queue_select as usize) {
            c[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            c[0x1a..0x1c].copy_from_slice(&q.vector.to_le_bytes());
            c[0x1c..0x1e].copy_from_slice(&(q.enabled as u16).to_le_bytes());
            c[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            c[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            c[0x28..0x30].copy_from_slice(&q.driver.to_le_bytes());
            c[0x30..0x38].copy_from_slice(&q.device.to_le_bytes());
        } else {
            c[0x1a..0x1c].copy_from_slice(&NO_VECTOR.to_le_bytes());
        }
        c
    }

    pub(super) fn read_common(&self, offset: u64, data: &mut [u8]) {
        let img = self.common_image();
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    pub(super) fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        let qs = self.queue_select as usize;
        let queue_locked = self.active || self.status & STATUS_DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_features_select = v as u32,
            (0x08, 4) => self.driver_features_select = v as u32,
            (0x0c, 4) => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    self.warn(format_args!("driver features written after FEATURES_OK"));
                    return;
                }
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            (0x10, 2) => self.config_vector = self.checked_vector(v as u16),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if qs < self.queues.len() && !queue_locked => {
                let size = v as u16;
                let max = self.max_size;
                if size == 0 || !size.is_power_of_two() || size > max {
                    self.warn(format_args!("queue {qs}: invalid size {size} (max {max})"));
                } else {
                    self.queues[qs].size = size;
                }
            }
            (0x1a, 2) if qs < self.queues.len() => {
                let vec = self.checked_vector(v as u16);
                self.queues[qs].vector = vec;
            }
            (0x1c, 2) if qs < self.queues.len() && !queue_locked => {
                if v == 1 {
                    self.queues[qs].enabled = true;
                }
            }
            (0x20..=0x37, 4) | (0x20 | 0x28 | 0x30, 8)
                if qs < self.queues.len() && !queue_locked =>
            {
                let q = &mut self.queues[qs];
                let field = match offset & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.driver,
                    _ => &mut q.device,
                };
                *field = match (offset & 4, data.len()) {
                    (_, 8) => v,
                    (0, _) => (*field & !0xffff_ffff) | v,
                    _ => (*field & 0xffff_ffff) | (v << 32),
                };
            }
            _ => self.warn(format_args!(
                "ignored common config write at {offset:#x} ({} bytes, value {v:#x})",
                data.len()
            )),
        }
    }

    /// The vector the device will use: the driver's choice if it exists, else NO_VECTOR
    /// (which the driver reads back to learn that the mapping failed).
    fn checked_vector(&self, v: u16) -> u16 {
        if (v as usize) < self.msix.num_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let new_bits = v & !self.status;
        let mut status = v & !STATUS_NEEDS_RESET;
        if new_bits & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features() | F_VERSION_1;
            let accepted = self.driver_features;
            if accepted & !offered != 0 || accepted & F_VERSION_1 == 0 {
                self.warn(format_args!("driver accepted features {accepted:#x}, offered {offered:#x}; FEATURES_OK refused"));
                status &= !STATUS_FEATURES_OK;
            }
        }
        self.status = status;
        if new_bits & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0 && !self.active {
            if let Err(e) = self.activate() {
                let msg = crate::error::error_chain(&e);
                self.warn(format_args!("activation failed: {msg}"));
                self.status |= STATUS_NEEDS_RESET;
            }
        }
        if status & STATUS_FAILED != 0 {
            log::info!("virtio-pci: driver set FAILED");
        }
    }

    fn activate(&mut self) -> Result<(), ActivationError> {
        let event_idx = self.driver_features & crate::devices::virtio::F_RING_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, r) in self.queues.iter().enumerate().filter(|(_, r)| r.enabled) {
            let bad = |what: &'static str, value: u64| {
                move |source| ActivationError::Queue {
                    queue: i,
                    what,
                    value,
                    source,
                }
            };
            let mut q =
                Queue::new(self.max_size).map_err(bad("maximum size", self.max_size.into()))?;
            q.try_set_size(r.size).map_err(bad("size", r.size.into()))?;
            q.try_set_desc_table_address(GuestAddress(r.desc))
                .map_err(bad("descriptor table address", r.desc))?;
            q.try_set_avail_ring_address(GuestAddress(r.driver))
                .map_err(bad("driver area address", r.driver))?;
            q.try_set_used_ring_address(GuestAddress(r.device))
                .map_err(bad("device area address", r.device))?;
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(ActivationError::OutsideMemory {
                    queue: i,
                    desc: r.desc,
                    driver: r.driver,
                    device: r.device,
                });
            }
            let irq = match self.vectors.get(r.vector as usize) {
                Some(v) => Some(v.fd.try_clone().map_err(ActivationError::EventFd)?),
                None => None,
            };
            let kick = self.kicks[i]
                .try_clone()
                .map_err(ActivationError::EventFd)?;
            active.push(ActiveQueue {
                index: i as u16,
                queue: q,
                kick,
                irq,
            });
        }
        if active.is_empty() {
            return Err(ActivationError::NoQueue);
        }
        self.device
            .activate(self.mem.clone(), self.driver_features, active)
            .map_err(ActivationError::Device)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        let regs = QueueRegs {
            size: self.max_size,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        };
        self.queues.iter_mut().for_each(|q| *q = regs);
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        self.status = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
        // Drain kicks that arrived while the device was not serving its queues.
        for k in &self.kicks {
            let _ = k.read();
        }
    }
}
