//! The live control plane: an HTTP/1.1 + JSON API on a Unix socket (`--api-socket`).
//!
//! One thread of its own (`api`) runs a tokio-uring runtime that serves the socket
//! (`server.rs`); it is never a vCPU or reactor thread. It reaches the VM only the way
//! every other thread does: the reactors by control message at their pass boundaries
//! (snapshots, the poll window), the stop through the [`ExitHandle`]. So the data path
//! does no more work than it does for SIGUSR1 reports and `--stats-json`, and a request
//! can only cost what it asked for (a snapshot, a poll-window change, a stop).
//!
//! The server outlives the VMs of a `ringvm bench` run: each VM registers itself through an
//! [`ApiHook`] when its devices exist and leaves before its reactors stop.

pub mod client;
pub mod http;
pub mod prometheus;
pub mod routes;
mod server;

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::metrics::{HlogWriter, Report};
use crate::reactor::PoolHandle;
use crate::vmm::exit::{ExitHandle, ExitReason};
use routes::{Control, ControlError, DeviceKind};

/// A snapshot this recent answers `GET /stats` and `/metrics` again instead of a new one,
/// so however many clients scrape, the reactors take at most one snapshot per period.
pub const SNAPSHOT_REUSE: Duration = Duration::from_millis(5);
/// The API thread's nice value: when it competes with a reactor (or a vCPU) for a core, a
/// client that floods the socket gets about a tenth of that core (weight 110 against
/// 1024), not half of it, which leaves 100 scrapes a second (well under 1 % of a core) room.
/// At 19 (a share of 1.5 %) scrapes queued up behind a busy vCPU: 10 to 46 answered a second.
const API_NICE: libc::c_int = 10;

/// How long stopping the API thread may take before ringvm leaves it behind.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors from starting the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Cannot serve the API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is in use by another process (a running ringvm?)")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or choose another --api-socket")]
    NotSocket { path: PathBuf },
    #[error("Failed to start the API thread")]
    Thread(#[source] crate::vmm::thread::ThreadError),
    #[error("The API thread stopped while starting")]
    Gone,
    #[error("Cannot set up the API thread's seccomp filter")]
    Seccomp(#[source] crate::seccomp::SeccompError),
}

/// A device whose poll window the API can change.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub kind: DeviceKind,
    /// The name in metrics and URLs (`blk0`, the disk's `id=`, `net0`).
    pub name: String,
    /// The keys the reactors know the device's queues by.
    pub keys: std::ops::Range<u64>,
    pub poll_us: u32,
    /// Queues (disks) or queue pairs (nets), as on the command line.
    pub queues: usize,
    /// Reactor index of each queue (disks) or queue pair (nets).
    pub reactors: Vec<usize>,
}

/// Statistics intervals of one VM (`PUT /stats/interval`), with its interval log.
struct Intervals {
    hlog: Option<(PathBuf, HlogWriter)>,
    count: u64,
    prev_elapsed: Duration,
    prev_requests: u64,
    /// The VM stopped and its last interval was written.
    closed: bool,
}

impl Intervals {
    /// Ends the current interval at `report` (a snapshot later than the previous one).
    fn close(&mut self, report: &Report) -> Result<Value, ControlError> {
        if let Some((_, w)) = &mut self.hlog {
            w.append(report)
                .map_err(|e| ControlError::Hlog(crate::error::error_chain(&e)))?;
        }
        self.count += 1;
        let requests = report.total_requests();
        let delta = requests.saturating_sub(self.prev_requests);
        let span = report.elapsed.saturating_sub(self.prev_elapsed);
        let v = json!({
            "interval": self.count,
            "start_s": self.prev_elapsed.as_secs_f64(),
            "end_s": report.elapsed.as_secs_f64(),
            "requests": delta,
            "iops": if span.is_zero() { 0.0 } else { delta as f64 / span.as_secs_f64() },
            "hlog": self.hlog.as_ref().map(|(p, _)| p.display().to_string()),
        });
        self.prev_elapsed = report.elapsed;
        self.prev_requests = requests;
        Ok(v)
    }
}

/// A running VM as the API sees it.
struct LiveVm {
    pool: Option<PoolHandle>,
    exit: ExitHandle,
    started: Instant,
    info: Value,
    devices: Vec<DeviceEntry>,
    intervals: Arc<Mutex<Intervals>>,
}

/// What the API thread and the VMs share.
struct Shared {
    command: &'static str,
    /// The core the API thread is pinned to, if any.
    api_core: Option<usize>,
    started: Instant,
    vm: Mutex<Option<LiveVm>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn reactor_error(e: crate::reactor::ReactorError) -> ControlError {
    ControlError::Reactor(e.to_string())
}

impl Shared {
    fn live<T>(&self, f: impl FnOnce(&LiveVm) -> T) -> Result<T, ControlError> {
        lock(&self.vm).as_ref().map(f).ok_or(ControlError::NoVm)
    }
}

impl Control for Shared {
    fn vm(&self) -> Result<Value, ControlError> {
        let g = lock(&self.vm);
        let mut v = match g.as_ref() {
            None => json!({ "state": "idle" }),
            Some(vm) => {
                let mut v = vm.info.clone();
                let devices = |kind| {
                    vm.devices
                        .iter()
                        .filter(|d| d.kind == kind)
                        .map(|d| {
                            json!({"id": d.name, "poll_us": d.poll_us, "queues": d.queues, "reactors": d.reactors})
                        })
                        .collect::<Vec<_>>()
                };
                v["state"] = json!(if vm.exit.is_requested() {
                    "stopping"
                } else {
                    "running"
                });
                v["uptime_s"] = json!(vm.started.elapsed().as_secs_f64());
                v["disks"] = json!(devices(DeviceKind::Disk));
                v["nets"] = json!(devices(DeviceKind::Net));
                v
            }
        };
        v["command"] = json!(self.command);
        v["api_core"] = json!(self.api_core);
        v["pid"] = json!(std::process::id());
        v["process_uptime_s"] = json!(self.started.elapsed().as_secs_f64());
        Ok(v)
    }

    fn render(&self, f: &mut dyn FnMut(&Report, f64) -> String) -> Result<String, ControlError> {
        let (pool, started) = self.live(|vm| (vm.pool.clone(), vm.started))?;
        let up = started.elapsed().as_secs_f64();
        // The cumulative report lives in the VM's pool, so a reused one is never an
        // earlier VM's.
        match pool {
            Some(p) => p
                .snapshot_with(SNAPSHOT_REUSE, |r| f(r, up))
                .map_err(reactor_error),
            None => Ok(f(
                &Report {
                    elapsed: started.elapsed(),
                    ..Default::default()
                },
                up,
            )),
        }
    }

    fn interval(&self) -> Result<Value, ControlError> {
        let (pool, intervals, started) =
            self.live(|vm| (vm.pool.clone(), vm.intervals.clone(), vm.started))?;
        // Held across the snapshot so the VM's last interval, written at its stop, comes
        // after this one.
        let mut iv = lock(&intervals);
        if iv.closed {
            return Err(ControlError::NoVm);
        }
        match pool {
            Some(p) => p
                .snapshot_with(Duration::ZERO, |r| iv.close(r))
                .map_err(reactor_error)?,
            None => iv.close(&Report {
                elapsed: started.elapsed(),
                ..Default::default()
            }),
        }
    }

    fn set_poll_us(&self, kind: DeviceKind, id: &str, us: u32) -> Result<Value, ControlError> {
        let unknown = || ControlError::UnknownDevice {
            kind,
            id: id.to_string(),
        };
        let (pool, dev) = self.live(|vm| {
            let d = vm.devices.iter().find(|d| d.kind == kind && d.name == id);
            (vm.pool.clone(), d.map(|d| d.keys.clone()))
        })?;
        let (Some(pool), Some(dev)) = (pool, dev) else {
            return Err(unknown());
        };
        let queues = pool
            .set_poll_max(dev.clone(), Duration::from_micros(u64::from(us)))
            .map_err(reactor_error)?;
        if let Some(vm) = lock(&self.vm).as_mut() {
            if let Some(d) = vm.devices.iter_mut().find(|d| d.keys == dev) {
                d.poll_us = us;
            }
        }
        Ok(json!({ "id": id, "kind": kind.as_str(), "poll_us": us, "queues_changed": queues }))
    }

    fn stop(&self) -> Result<(), ControlError> {
        let exit = self.live(|vm| vm.exit.clone())?;
        exit.request(ExitReason::ApiStop);
        Ok(())
    }
}

/// How a VM joins the control plane: built by the command for each VM and handed to the
/// device set, which registers the VM once its devices exist and leaves before stopping.
#[derive(Clone)]
pub struct ApiHook {
    shared: Arc<Shared>,
    hlog: Option<PathBuf>,
}

/// The parts of a VM the API reports and acts on.
pub struct VmLink {
    pub pool: Option<PoolHandle>,
    pub exit: ExitHandle,
    /// Static configuration for `GET /vm`.
    pub info: Value,
    pub devices: Vec<DeviceEntry>,
}

/// A registered VM's intervals, for its last interval at stop.
pub struct Registration(Arc<Mutex<Intervals>>);

impl ApiHook {
    /// Registers a VM; with an interval log path, creates the log (one interval per
    /// `PUT /stats/interval`, and a last one at stop).
    pub fn register(&self, link: VmLink) -> Result<(), crate::metrics::HlogError> {
        let hlog = match &self.hlog {
            Some(p) => Some((p.clone(), HlogWriter::create(p, SystemTime::now())?)),
            None => None,
        };
        *lock(&self.shared.vm) = Some(LiveVm {
            pool: link.pool,
            exit: link.exit,
            started: Instant::now(),
            info: link.info,
            devices: link.devices,
            intervals: Arc::new(Mutex::new(Intervals {
                hlog,
                count: 0,
                prev_elapsed: Duration::ZERO,
                prev_requests: 0,
                closed: false,
            })),
        });
        Ok(())
    }

    /// Removes the VM from the API (before its reactors stop: requests then get a 503, not
    /// a timeout).
    pub fn unregister(&self) -> Option<Registration> {
        lock(&self.shared.vm)
            .take()
            .map(|vm| Registration(vm.intervals))
    }

    /// Whether this VM writes its interval log through the API (then the command does not).
    pub fn writes_hlog(&self) -> bool {
        self.hlog.is_some()
    }
}

impl Registration {
    /// Writes the last interval, up to the reactors' final report.
    pub fn finish(self, report: &Report) {
        let mut iv = lock(&self.0);
        if let Err(e) = iv.close(report) {
            log::error!("{e}");
        }
        iv.closed = true;
    }
}

/// The API socket and its thread. Dropping it stops the thread and removes the socket.
pub struct ApiServer {
    path: PathBuf,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Option<()>>>,
}

/// Binds `path` with mode 0600 from the start: the socket is made in a private directory
/// (0700), restricted, then renamed into place, so no one else can connect in between.
fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ApiError> {
    let err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(ApiError::NotSocket { path: path.into() });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse { path: path.into() });
        }
        // A socket nobody serves: left by a ringvm that was killed.
        std::fs::remove_file(path).map_err(err)?;
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = dir.join(format!(".ringvm-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let tmp = private.join("s");
    let result = (|| {
        // Not tokio_uring's UnixListener::bind: tokio-uring 0.5 sets SO_REUSEPORT on every
        // socket it binds, which Linux refuses for Unix sockets since 6.12.9 / 6.1.124
        // (EOPNOTSUPP; tokio-uring issue #323, unreleased fix #325).
        let l = std::os::unix::net::UnixListener::bind(&tmp)?;
        l.set_nonblocking(true)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result.map_err(err)
}

impl ApiServer {
    /// Serves `path` from a new thread `api`, pinned to `core` when given, which installs
    /// the control plane's seccomp filter (`seccomp`) once the socket is bound. `command`
    /// names the ringvm command in `GET /vm`. Returns once the socket accepts connections.
    pub fn start(
        path: &Path,
        command: &'static str,
        core: Option<usize>,
        seccomp: crate::seccomp::SeccompMode,
    ) -> Result<ApiServer, ApiError> {
        let filter =
            crate::seccomp::ThreadFilter::new(crate::seccomp::ThreadKind::Control, seccomp)
                .map_err(ApiError::Seccomp)?;
        let shared = Arc::new(Shared {
            command,
            api_core: core,
            started: Instant::now(),
            vm: Mutex::new(None),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (shutdown, shutdown_rx) = oneshot::channel();
        // A panic on the API thread must not stop the VM: it gets an exit handle of its own.
        let exit = ExitHandle::new().map_err(|e| ApiError::Bind {
            path: path.into(),
            source: e,
        })?;
        let (p, sh) = (path.to_path_buf(), shared.clone());
        // The thread's own filter goes on after the bind (which needs socket, bind, mkdir,
        // chmod, rename: calls the running server never makes); the spawn helper installs none.
        let unfiltered = crate::seccomp::ThreadFilter::default();
        let thread = crate::vmm::thread::spawn("api", core, unfiltered, exit, move || {
            // SAFETY: setpriority with PRIO_PROCESS and 0 changes the calling thread's nice
            // value only (Linux keeps it per thread); no memory is involved.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, API_NICE) } != 0 {
                log::warn!("api: cannot lower the thread's priority");
            }
            tokio_uring::builder().entries(64).start(async move {
                let listener = match bind(&p) {
                    Ok(l) => match filter.apply("api") {
                        Ok(()) => {
                            let _ = ready_tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(ApiError::Seccomp(e)));
                            return;
                        }
                    },
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                server::serve(listener, sh, shutdown_rx).await;
            })
        })
        .map_err(ApiError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ApiError::Gone),
        }
        Ok(ApiServer {
            path: path.to_path_buf(),
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// A hook for the next VM; `hlog`: its interval log, if any.
    pub fn hook(&self, hlog: Option<PathBuf>) -> ApiHook {
        ApiHook {
            shared: self.shared.clone(),
            hlog,
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::error!(
                    "the API thread did not stop within {} ms",
                    STOP_TIMEOUT.as_millis()
                );
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
