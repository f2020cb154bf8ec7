//! The standard device set behind `--disk` and `--net`: one reactor pool on the I/O
//! cores, a virtio-blk device per disk and a virtio-net device per tap, the control plane
//! registration, and the statistics report at exit and on SIGUSR1.
//!
//! This module sits above `vmm/`: the VM assembly (`vmm::vm`) builds the machine and calls
//! back through [`VmExtension`], knowing no concrete device; the device manager knows the
//! devices and their configuration and plugs them in through [`DeviceContext`]. Layers, each
//! using only the ones below it: `commands` → `device_manager` → `vmm::vm` → `config` →
//! device configs, `devices/`, `reactor/` → `vmm::{bus, irq, exit, thread, …}`
//! (`scripts/modcycles.py` checks that no module cycle remains).

use std::time::Duration;

use crate::api::routes::DeviceKind;
use crate::api::{ApiHook, DeviceEntry, VmLink};
use crate::config::VmConfig;
use crate::devices::virtio::block::{BlockDevice, BlockError};
use crate::devices::virtio::net::{NetDevice, NetError};
use crate::metrics::{HlogError, Report};
use crate::reactor::{ReactorError, ReactorOptions, ReactorPool};
use crate::vmm::vm::{DeviceContext, VmError, VmExtension};

/// Errors from setting up the standard device set.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("Failed to start the I/O reactors")]
    Reactors(#[source] ReactorError),
    #[error("Failed to set up disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("Failed to set up network device {index}")]
    Net {
        index: usize,
        #[source]
        source: NetError,
    },
    #[error("Cannot attach {name}")]
    Plug {
        name: String,
        #[source]
        source: VmError,
    },
    #[error("Failed to register the VM with the control plane")]
    Api(#[source] HlogError),
}

#[derive(Default)]
pub struct StandardDevices {
    pool: Option<ReactorPool>,
    /// The reactors' final statistics, once the VM stopped.
    pub report: Option<Report>,
    /// The control plane (`--api-socket`) this VM joins, if any.
    pub api: Option<ApiHook>,
}

impl StandardDevices {
    /// The running pool (for progress snapshots).
    pub fn pool(&self) -> Option<&ReactorPool> {
        self.pool.as_ref()
    }
}

impl StandardDevices {
    /// Starts the reactor pool and plugs in every `--disk` and `--net` device.
    pub fn attach_devices(&mut self, ctx: &mut DeviceContext) -> Result<(), DeviceManagerError> {
        let config = ctx.config;
        if config.disks.is_empty() && config.nets.is_empty() {
            return self.join_api(ctx, None, Vec::new());
        }
        let opts = ReactorOptions {
            cores: config.io_cores.clone(),
            sqpoll: config.sqpoll,
            seccomp: config.seccomp,
            restrict_ring: config.seccomp != crate::seccomp::SeccompMode::Off,
            ..Default::default()
        }
        .with_env_overrides();
        let pool =
            ReactorPool::start(opts, ctx.exit.clone()).map_err(DeviceManagerError::Reactors)?;
        let mut entries = Vec::new();
        for (index, disk) in config.disks.iter().enumerate() {
            let dev = BlockDevice::new(disk, &pool)
                .map_err(|source| DeviceManagerError::Disk { index, source })?;
            entries.push(DeviceEntry {
                kind: DeviceKind::Disk,
                name: dev.name().to_string(),
                keys: dev.pool_keys(),
                poll_us: disk.poll_us,
                queues: usize::from(disk.queues),
                reactors: dev.placement().to_vec(),
            });
            plug(ctx, dev.name().to_string(), Box::new(dev))?;
        }
        attach_nets(ctx, &pool, &mut entries)?;
        let handle = pool.handle();
        self.pool = Some(pool);
        self.join_api(ctx, Some(handle), entries)
    }
}

impl VmExtension for StandardDevices {
    fn attach(&mut self, ctx: &mut DeviceContext) -> Result<(), VmError> {
        self.attach_devices(ctx)
            .map_err(|e| VmError::Attach(Box::new(e)))
    }

    fn on_report_signal(&mut self) {
        let table = |r: &Report| r.table();
        if let Some(Ok(t)) = self
            .pool
            .as_ref()
            .map(|p| p.snapshot_with(Duration::ZERO, table))
        {
            eprint!("{t}");
        }
    }

    fn on_stop(&mut self) {
        // Leave the API first: its requests get a clear 503 instead of a reactor timeout.
        let registration = self.api.as_ref().and_then(|a| a.unregister());
        if let Some(pool) = self.pool.take() {
            match pool.stop() {
                Ok(r) => self.report = Some(r),
                Err(e) => log::error!("stopping the reactors: {e}"),
            }
        }
        if let Some(reg) = registration {
            let empty = Report::default();
            reg.finish(self.report.as_ref().unwrap_or(&empty));
        }
    }
}

impl StandardDevices {
    /// Registers the VM with the control plane, if there is one.
    fn join_api(
        &mut self,
        ctx: &DeviceContext,
        pool: Option<crate::reactor::PoolHandle>,
        devices: Vec<DeviceEntry>,
    ) -> Result<(), DeviceManagerError> {
        let Some(api) = &self.api else {
            return Ok(());
        };
        api.register(VmLink {
            pool,
            exit: ctx.exit.clone(),
            info: vm_info(ctx.config),
            devices,
        })
        .map_err(DeviceManagerError::Api)
    }
}

/// The static part of `GET /vm`.
fn vm_info(c: &VmConfig) -> serde_json::Value {
    serde_json::json!({
        "kernel": c.kernel.display_path().display().to_string(),
        "cmdline": c.cmdline,
        "memory_bytes": c.memory,
        "vcpus": c.vcpus,
        "vcpu_cores": c.vcpu_cores,
        "io_cores": c.io_cores,
        "hugepages": format!("{:?}", c.hugepages),
        "sqpoll": c.sqpoll,
    })
}

/// Plugs `dev` into PCI bus 0 behind its own virtio-pci function.
fn plug(
    ctx: &mut DeviceContext,
    name: String,
    dev: Box<dyn crate::devices::virtio::VirtioDevice>,
) -> Result<(), DeviceManagerError> {
    ctx.add_virtio(dev)
        .map(|_| ())
        .map_err(|source| DeviceManagerError::Plug { name, source })
}

// ---- virtio-net (`--net`) -------------------------------------------------------------

/// One virtio-net device per `--net`, on the same reactor pool as the disks. A tap that
/// cannot be opened or created stops start-up with its name and the reason.
fn attach_nets(
    ctx: &mut DeviceContext,
    pool: &ReactorPool,
    entries: &mut Vec<DeviceEntry>,
) -> Result<(), DeviceManagerError> {
    for (index, net) in ctx.config.nets.iter().enumerate() {
        let dev = NetDevice::new(net, pool)
            .map_err(|source| DeviceManagerError::Net { index, source })?;
        entries.push(DeviceEntry {
            kind: DeviceKind::Net,
            name: dev.name().to_string(),
            keys: dev.pool_keys(),
            poll_us: net.poll_us,
            queues: usize::from(net.queues),
            reactors: dev.placement().to_vec(),
        });
        plug(ctx, dev.name().to_string(), Box::new(dev))?;
    }
    Ok(())
}
