//! The standard device set behind `--disk`: one reactor pool on the I/O cores and a
//! virtio-blk device per disk, with the statistics report at exit and on SIGUSR1.

use crate::devices::virtio::block::BlockDevice;
use crate::metrics::Report;
use crate::reactor::{ReactorOptions, ReactorPool};

use super::vm::{DeviceContext, VmError, VmExtension};

#[derive(Default)]
pub struct StandardDevices {
    pool: Option<ReactorPool>,
    /// The reactors' final statistics, once the VM stopped.
    pub report: Option<Report>,
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
            return Ok(());
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
        for disk in &config.disks {
            let dev =
                BlockDevice::new(disk, &pool).map_err(|e| VmError::Devices(error_chain(&e)))?;
            ctx.add_virtio(Box::new(dev))?;
        }
        attach_nets(ctx, &pool)?;
        self.pool = Some(pool);
        Ok(())
    }

    fn on_report_signal(&mut self) {
        if let Some(Ok(r)) = self.pool.as_ref().map(|p| p.snapshot()) {
            eprint!("{}", r.table());
        }
    }

    fn on_stop(&mut self) {
        if let Some(pool) = self.pool.take() {
            match pool.stop() {
                Ok(r) => self.report = Some(r),
                Err(e) => log::error!("stopping the reactors: {e}"),
            }
        }
    }
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
fn attach_nets(ctx: &mut DeviceContext, pool: &ReactorPool) -> Result<(), VmError> {
    for net in &ctx.config.nets {
        let dev = crate::devices::virtio::net::NetDevice::new(net, pool)
            .map_err(|e| VmError::Devices(error_chain(&e)))?;
        ctx.add_virtio(Box::new(dev))?;
    }
    Ok(())
}
