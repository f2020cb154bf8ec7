//! The standard device set behind `--disk`: one reactor pool on the I/O cores and a
//! virtio-blk device per disk, with the statistics report at exit and on SIGUSR1.

use std::time::Duration;

use crate::api::routes::DeviceKind;
use crate::api::{ApiHook, DeviceEntry, VmLink};
use crate::config::VmConfig;
use crate::devices::virtio::block::BlockDevice;
use crate::metrics::Report;
use crate::reactor::{ReactorOptions, ReactorPool};

use super::vm::{DeviceContext, VmError, VmExtension};

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

impl VmExtension for StandardDevices {
    fn attach(&mut self, ctx: &mut DeviceContext) -> Result<(), VmError> {
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
        let pool = ReactorPool::start(opts, ctx.exit.clone())
            .map_err(|e| VmError::Devices(error_chain(&e)))?;
        let mut entries = Vec::new();
        for disk in &config.disks {
            let dev =
                BlockDevice::new(disk, &pool).map_err(|e| VmError::Devices(error_chain(&e)))?;
            entries.push(DeviceEntry {
                kind: DeviceKind::Disk,
                name: dev.name().to_string(),
                keys: dev.pool_keys(),
                poll_us: disk.poll_us,
                queues: usize::from(disk.queues),
                reactors: dev.placement().to_vec(),
            });
            ctx.add_virtio(Box::new(dev))?;
        }
        attach_nets(ctx, &pool, &mut entries)?;
        let handle = pool.handle();
        self.pool = Some(pool);
        self.join_api(ctx, Some(handle), entries)
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
    ) -> Result<(), VmError> {
        let Some(api) = &self.api else {
            return Ok(());
        };
        api.register(VmLink {
            pool,
            exit: ctx.exit.clone(),
            info: vm_info(ctx.config),
            devices,
        })
        .map_err(|e| VmError::Devices(error_chain(&e)))
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

/// "error: cause: root cause" for a typed error.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

// ---- virtio-net (`--net`) -------------------------------------------------------------

/// One virtio-net device per `--net`, on the same reactor pool as the disks. A tap that
/// cannot be opened or created stops start-up with its name and the reason.
fn attach_nets(
    ctx: &mut DeviceContext,
    pool: &ReactorPool,
    entries: &mut Vec<DeviceEntry>,
) -> Result<(), VmError> {
    for net in &ctx.config.nets {
        let dev = crate::devices::virtio::net::NetDevice::new(net, pool)
            .map_err(|e| VmError::Devices(error_chain(&e)))?;
        entries.push(DeviceEntry {
            kind: DeviceKind::Net,
            name: dev.name().to_string(),
            keys: dev.pool_keys(),
            poll_us: net.poll_us,
            queues: usize::from(net.queues),
            reactors: dev.placement().to_vec(),
        });
        ctx.add_virtio(Box::new(dev))?;
    }
    Ok(())
}
