//! The vhost-user-blk session: the state one front end builds with its messages, turned into
//! the same queue activation the virtio-pci transport hands a [`BlockDevice`] at DRIVER_OK.
//!
//! A queue starts once it has a size, ring addresses, a kick eventfd and is enabled (at once
//! when PROTOCOL_FEATURES was not negotiated, else on SET_VRING_ENABLE); it then lives on
//! its reactor exactly as a ringvm guest's queue does. A message that changes a running queue
//! (a new call eventfd when QEMU masks a vector, a new memory table) stops it, applies the
//! change and starts it again where it stopped. GET_VRING_BASE stops the queue on its
//! reactor, which completes and publishes the requests in flight, and answers with the next
//! avail index. Every refused message is logged with its reason; the server then closes
//! the connection.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::memory::{MemoryTable, RegionSpec};
use crate::devices::virtio::block::config::QUEUE_SIZE_MAX;
use crate::devices::virtio::block::BlockDevice;
use crate::devices::virtio::{ActiveQueue, VirtioDevice, F_RING_EVENT_IDX};

/// Largest configuration-space read a front end may ask for.
const CONFIG_READ_MAX: u32 = 256;
/// `final_avail` before the queue's reactor reported it.
const NOT_REPORTED: u32 = u32::MAX;

/// Ring addresses in the front end's address space.
#[derive(Debug, Clone, Copy)]
struct VringAddr {
    desc: u64,
    avail: u64,
    used: u64,
}

struct Vring {
    size: u16,
    addr: Option<VringAddr>,
    base: u16,
    kick: Option<EventFd>,
    /// `None`: the front end polls (or has not sent one yet); no interrupts.
    call: Option<EventFd>,
    enabled: bool,
    started: bool,
    final_avail: Arc<AtomicU32>,
}

impl Vring {
    fn new() -> Self {
        Vring {
            size: 0,
            addr: None,
            base: 0,
            kick: None,
            call: None,
            enabled: false,
            started: false,
            final_avail: Arc::new(AtomicU32::new(NOT_REPORTED)),
        }
    }
}

/// One disk served over vhost-user, and the state of the connected front end.
pub struct VhostBlk {
    dev: BlockDevice,
    acked_features: u64,
    acked_protocol: u64,
    mem: Option<MemoryTable>,
    vrings: Vec<Vring>,
    /// Queue starts since the back end began (for tests and logs).
    starts: u64,
}

/// Logs why a message is refused; the server closes the connection on the error.
fn refuse(why: impl std::fmt::Display) -> VuError {
    log::warn!("vhost-user: refused: {why}");
    VuError::InvalidParam
}

/// An eventfd from a passed file descriptor; anything else is refused (a regular file as
/// "kick" would look readable forever, as "call" would be written to).
fn eventfd(file: File, what: &str, index: u8) -> VuResult<EventFd> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if link != "anon_inode:[eventfd]" {
        return Err(refuse(format_args!(
            "the {what} file descriptor of queue {index} is not an eventfd ({link})"
        )));
    }
    // SAFETY: the fd was just taken out of an owned File, so nothing else owns or closes it.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

impl VhostBlk {
    /// Serves `dev` (its queues and reactors as configured by `--disk`).
    pub fn new(dev: BlockDevice) -> Self {
        let n = dev.num_queues();
        VhostBlk {
            dev,
            acked_features: 0,
            acked_protocol: 0,
            mem: None,
            vrings: (0..n).map(|_| Vring::new()).collect(),
            starts: 0,
        }
    }

    /// The block device (name, capacity, placement).
    pub fn device(&self) -> &BlockDevice {
        &self.dev
    }

    /// Queue starts so far.
    pub fn starts(&self) -> u64 {
        self.starts
    }

    /// The front end went away: stop every queue (completing what is in flight) and forget
    /// its memory and settings, ready for the next front end.
    pub fn disconnect(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
        self.mem = None;
        self.acked_features = 0;
        self.acked_protocol = 0;
        for v in &mut self.vrings {
            *v = Vring::new();
        }
    }

    fn index(&self, index: u32, what: &str) -> VuResult<usize> {
        let i = index as usize;
        if i >= self.vrings.len() {
            return Err(refuse(format_args!(
                "{what} for queue {index}, but the disk has {} queues",
                self.vrings.len()
            )));
        }
        Ok(i)
    }

    /// Stops queue `i` if it runs and records where it stopped. Returns whether it ran.
    fn stop(&mut self, i: usize) -> bool {
        let v = &mut self.vrings[i];
        if !v.started {
            return false;
        }
        self.dev.stop_queue(i as u16);
        v.started = false;
        match v.final_avail.swap(NOT_REPORTED, Ordering::AcqRel) {
            NOT_REPORTED => log::error!(
                "vhost-user: queue {i} did not report where it stopped; resuming at {}",
                v.base
            ),
            at => v.base = at as u16,
        }
        true
    }

    /// Starts queue `i` when it has everything it needs.
    fn try_start(&mut self, i: usize) -> VuResult<()> {
        let v = &self.vrings[i];
        let (Some(mem), Some(addr), Some(kick)) = (&self.mem, v.addr, &v.kick) else {
            return Ok(());
        };
        if v.started || !v.enabled || v.size == 0 {
            return Ok(());
        }
        let size = u64::from(v.size);
        let translate = |va: u64, len: u64, what: &str| {
            mem.va_to_gpa(va, len).ok_or_else(|| {
                refuse(format_args!(
                    "queue {i}: the {what} at front-end address {va:#x} is not in the memory table"
                ))
            })
        };
        let desc = translate(addr.desc, 16 * size, "descriptor table")?;
        let avail = translate(addr.avail, 6 + 2 * size, "avail ring")?;
        let used = translate(addr.used, 6 + 8 * size, "used ring")?;
        let bad = |e| refuse(format_args!("queue {i}: {e:?}"));
        let mut q = Queue::new(QUEUE_SIZE_MAX).map_err(bad)?;
        q.try_set_size(v.size).map_err(bad)?;
        q.try_set_desc_table_address(GuestAddress(desc))
            .map_err(bad)?;
        q.try_set_avail_ring_address(GuestAddress(avail))
            .map_err(bad)?;
        q.try_set_used_ring_address(GuestAddress(used))
            .map_err(bad)?;
        q.set_event_idx(self.acked_features & F_RING_EVENT_IDX != 0);
        let used_idx: u16 = mem
            .memory()
            .read_obj(GuestAddress(used + 2))
            .map_err(|e| refuse(format_args!("queue {i}: cannot read the used index: {e}")))?;
        // Requests the front end saw popped but never completed (a back end that died) are
        // served again, as libvhost-user does.
        if used_idx != v.base {
            log::info!(
                "vhost-user: queue {i}: base {} but used index {used_idx}; resuming at {used_idx}",
                v.base
            );
        }
        q.set_next_avail(used_idx);
        q.set_next_used(used_idx);
        q.set_ready(true);
        if !q.is_valid(mem.memory()) {
            return Err(refuse(format_args!(
                "queue {i}: rings at {desc:#x}/{avail:#x}/{used:#x} are not valid in guest memory"
            )));
        }
        let dup = |e: &EventFd| {
            e.try_clone()
                .map_err(|e| refuse(format_args!("queue {i}: cannot duplicate an eventfd: {e}")))
        };
        let active = ActiveQueue {
            index: i as u16,
            queue: q,
            kick: dup(kick)?,
            irq: v.call.as_ref().map(dup).transpose()?,
        };
        let final_avail = v.final_avail.clone();
        let mem = mem.memory().clone();
        self.dev
            .start_queue(&mem, active, final_avail)
            .map_err(|e| refuse(format_args!("queue {i}: {e}")))?;
        let v = &mut self.vrings[i];
        v.started = true;
        v.base = used_idx;
        self.starts += 1;
        log::info!(
            "vhost-user: {} queue {i} started (size {}, {} interrupts)",
            self.dev.name(),
            v.size,
            if v.call.is_some() { "with" } else { "no" }
        );
        Ok(())
    }

    /// Applies `change` to queue `index`, stopping it around the change when it runs.
    fn update(
        &mut self,
        index: u32,
        what: &str,
        change: impl FnOnce(&mut Vring) -> VuResult<()>,
    ) -> VuResult<()> {
        let i = self.index(index, what)?;
        let was = self.stop(i);
        change(&mut self.vrings[i])?;
        if was || self.vrings[i].kick.is_some() {
            self.try_start(i)?;
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        self.dev.offered_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn offered_protocol() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn unsupported(what: &str) -> VuError {
        refuse(format_args!("{what} is not supported"))
    }
}

impl VhostUserBackendReqHandlerMut for VhostBlk {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let extra = features & !self.offered_features();
        if extra != 0 {
            return Err(refuse(format_args!(
                "SET_FEATURES acknowledges bits {extra:#x} that were not offered"
            )));
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        let specs: Vec<RegionSpec> = ctx
            .iter()
            .map(|r| RegionSpec {
                guest_phys_addr: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        let table = MemoryTable::new(&specs, files).map_err(|e| {
            refuse(format_args!(
                "SET_MEM_TABLE: {}",
                crate::error::error_chain(&e)
            ))
        })?;
        let running: Vec<usize> = (0..self.vrings.len()).filter(|&i| self.stop(i)).collect();
        log::info!(
            "vhost-user: memory table of {} regions, {} MiB{}",
            specs.len(),
            table.size() >> 20,
            if table.hugetlb() { " (hugetlbfs)" } else { "" }
        );
        self.mem = Some(table);
        for i in running {
            self.try_start(i)?;
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(QUEUE_SIZE_MAX) || !num.is_power_of_two() {
            return Err(refuse(format_args!(
                "SET_VRING_NUM {num} for queue {index}: a queue size is a power of two up to {QUEUE_SIZE_MAX}"
            )));
        }
        self.update(index, "SET_VRING_NUM", |v| {
            v.size = num as u16;
            Ok(())
        })
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return Err(Self::unsupported("dirty logging (VHOST_VRING_F_LOG)"));
        }
        self.update(index, "SET_VRING_ADDR", |v| {
            v.addr = Some(VringAddr {
                desc: descriptor,
                avail: available,
                used,
            });
            Ok(())
        })
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let Ok(base) = u16::try_from(base) else {
            return Err(refuse(format_args!(
                "SET_VRING_BASE {base} for queue {index} does not fit a split ring's 16-bit index"
            )));
        };
        self.update(index, "SET_VRING_BASE", |v| {
            v.base = base;
            Ok(())
        })
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let i = self.index(index, "GET_VRING_BASE")?;
        self.stop(i);
        let v = &mut self.vrings[i];
        // The ring is stopped until the front end kicks it off again with SET_VRING_KICK.
        v.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(v.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let kick = fd.map(|f| eventfd(f, "kick", index)).transpose()?;
        if kick.is_none() {
            return Err(Self::unsupported("a queue without a kick eventfd"));
        }
        let protocol = self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.update(u32::from(index), "SET_VRING_KICK", |v| {
            v.kick = kick;
            if protocol == 0 {
                v.enabled = true;
            }
            Ok(())
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let call = fd.map(|f| eventfd(f, "call", index)).transpose()?;
        self.update(u32::from(index), "SET_VRING_CALL", |v| {
            v.call = call;
            Ok(())
        })
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        // Errors are logged by the queue; the front end's error eventfd is not used.
        self.index(u32::from(index), "SET_VRING_ERR").map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(Self::offered_protocol())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let extra = features & !Self::offered_protocol().bits();
        if extra != 0 {
            return Err(refuse(format_args!(
                "SET_PROTOCOL_FEATURES acknowledges bits {extra:#x} that were not offered"
            )));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let i = self.index(index, "SET_VRING_ENABLE")?;
        if !enable {
            self.stop(i);
        }
        self.vrings[i].enabled = enable;
        self.try_start(i)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        if size > CONFIG_READ_MAX || offset > CONFIG_READ_MAX {
            return Err(refuse(format_args!(
                "GET_CONFIG of {size} bytes at {offset} (the space is {CONFIG_READ_MAX} bytes at most)"
            )));
        }
        let mut buf = vec![0u8; size as usize];
        crate::devices::virtio::read_config_bytes(
            self.dev.config_space(),
            u64::from(offset),
            &mut buf,
        );
        Ok(buf)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        Err(refuse(format_args!(
            "SET_CONFIG of {} bytes at {offset}: the configuration space is read-only",
            buf.len()
        )))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(Self::unsupported("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(Self::unsupported("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        Err(Self::unsupported("GET_INFLIGHT_FD"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(Self::unsupported("SET_INFLIGHT_FD"))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(Self::unsupported("GET_MAX_MEM_SLOTS"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<u64>> {
        Err(Self::unsupported("ADD_MEM_REG"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(Self::unsupported("REM_MEM_REG"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(Self::unsupported("SET_DEVICE_STATE_FD (migration)"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(Self::unsupported("CHECK_DEVICE_STATE (migration)"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(Self::unsupported("GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(Self::unsupported("SET_LOG_BASE (dirty logging)"))
    }
}

impl Drop for VhostBlk {
    fn drop(&mut self) {
        self.disconnect();
    }
}

#[cfg(test)]
mod tests;
