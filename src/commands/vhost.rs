//! `ringvm vhost-user-blk`: serve one disk to another VMM over vhost-user.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ringvm::cli::VhostUserBlkArgs;
use ringvm::devices::virtio::block::{BlockDevice, DiskConfig};
use ringvm::reactor::{ReactorOptions, ReactorPool};
use ringvm::seccomp::ThreadFilter;
use ringvm::vhost::{self, VhostBlk};
use ringvm::vmm::exit::{ExitHandle, ExitReason};
use ringvm::vmm::signals::{Event, Signals};
use ringvm::vmm::thread;

/// Serves the disk until SIGINT/SIGTERM (or, with `--once`, the first front end's
/// disconnect), then prints the per-queue statistics.
pub fn vhost_user_blk(args: &VhostUserBlkArgs) -> anyhow::Result<u8> {
    let disk: DiskConfig = args.disk.parse().context("Invalid --disk")?;
    let sigs = Signals::install();
    let cores = match &args.io_cores {
        Some(c) if !c.is_empty() => c.clone(),
        _ => vec![std::thread::available_parallelism().map_or(1, |n| n.get()) - 1],
    };
    let exit = ExitHandle::new().context("Cannot create the exit eventfd")?;
    let seccomp: ringvm::seccomp::SeccompMode = args
        .seccomp
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let opts = ReactorOptions {
        cores: cores.clone(),
        sqpoll: args.sqpoll,
        seccomp,
        restrict_ring: seccomp != ringvm::seccomp::SeccompMode::Off,
        ..Default::default()
    }
    .with_env_overrides();
    let pool = ReactorPool::start(opts, exit.clone()).context("Cannot start the reactors")?;
    let dev = BlockDevice::new(&disk, &pool).context("Cannot open the disk")?;
    let name = dev.name().to_string();
    let listener = vhost::bind(&args.socket)?;
    eprintln!(
        "ringvm: serving {name} ({} MiB, {} queues, reactors on cores {cores:?}) as vhost-user-blk on {}",
        dev.capacity_sectors() >> 11,
        disk.queues,
        args.socket.display()
    );
    let session = Arc::new(Mutex::new(VhostBlk::new(dev)));
    let (s, ex, once) = (session.clone(), exit.clone(), args.once);
    // The protocol thread's own filter (the socket is bound above, on this thread); the
    // reactors installed theirs when the pool started.
    let filter = ThreadFilter::new(ringvm::seccomp::ThreadKind::Vhost, seccomp)
        .context("Cannot build the vhost-ctl seccomp filter")?;
    let ctl = thread::spawn("vhost-ctl", None, filter, exit.clone(), move || {
        let r = vhost::serve(listener, s, ex.clone(), once);
        ex.request(ExitReason::Reset);
        r
    })?;
    loop {
        if exit.wait_timeout(Duration::from_millis(200)).is_some() {
            break;
        }
        match sigs.as_ref().and_then(Signals::poll) {
            Some(Event::Stop(signal)) => exit.request(ExitReason::Signal { signal }),
            Some(Event::Report) => match pool.snapshot() {
                Ok(r) => eprint!("{}", r.table()),
                Err(e) => log::warn!("statistics: {e}"),
            },
            None => {}
        }
    }
    let served = ctl.join();
    let _ = std::fs::remove_file(&args.socket);
    // The session holds the device, whose queues must leave the reactors before they stop.
    drop(session);
    let report = pool.stop().context("Stopping the reactors")?;
    eprint!("{}", report.table());
    if let Some(p) = &args.stats_json {
        std::fs::write(p, report.to_json())
            .with_context(|| format!("Cannot write {}", p.display()))?;
    }
    if let Some(p) = &args.hlog {
        report.write_hlog(p)?;
    }
    match served {
        Ok(Some(r)) => r.context("vhost-user server failed")?,
        _ => anyhow::bail!("The vhost-user control thread panicked"),
    }
    let reason = exit.reason().unwrap_or(ExitReason::Reset);
    Ok(match reason {
        ExitReason::Signal { .. } | ExitReason::Reset => 0,
        r => {
            eprintln!("ringvm: {}", r.describe());
            r.status() as u8
        }
    })
}
