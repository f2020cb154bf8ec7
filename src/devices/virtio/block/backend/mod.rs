//! Disk back ends behind one enum: [`UringBackend`] (file or block device through the
//! reactor's io_uring) and [`NullBackend`] (completes without I/O).
//!
//! A back end is opened once by the device on the VMM thread ([`Backend::open`]); each queue
//! then gets a [`QueueIo`] on its reactor, which turns requests into SQEs.

pub mod fallback;
pub mod lock;
pub mod null;
pub mod uring;

pub use fallback::Retry;
pub use null::NullBackend;
pub use uring::{OpenOptions, QueueIo, UringBackend};

use std::os::fd::RawFd;
use std::path::PathBuf;

use super::config::{BackendKind, DiskConfig};
use super::request::SECTOR_SHIFT;

/// Errors opening a disk (start-up errors, so they name the file).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Disk image {path} is smaller than one 512-byte sector")]
    Empty { path: PathBuf },
    #[error("A null disk needs size= or path=")]
    NoSize,
    #[error("Disk image {path} is in use by {holder}: {conflict} (image locking as QEMU does it; lock=off disables it)")]
    Locked {
        path: PathBuf,
        conflict: lock::Conflict,
        holder: lock::Holder,
    },
    #[error("Cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An opened disk.
#[derive(Debug)]
pub enum Backend {
    Uring(UringBackend),
    Null(NullBackend),
}

impl Backend {
    /// Opens the disk `cfg` names. With `backend=null` and a `path`, the file only gives the
    /// capacity.
    pub fn open(cfg: &DiskConfig) -> Result<Backend, BackendError> {
        match (cfg.backend, &cfg.path) {
            (BackendKind::Uring, Some(p)) => Ok(Backend::Uring(UringBackend::open(
                p,
                OpenOptions {
                    readonly: cfg.readonly,
                    direct: cfg.direct,
                    lock: cfg.lock,
                },
            )?)),
            (BackendKind::Uring, None) => Err(BackendError::NoSize),
            (BackendKind::Null, _) => {
                let bytes = match (cfg.size, &cfg.path) {
                    (Some(s), _) => s,
                    (None, Some(p)) => uring::size_of_path(p)?,
                    (None, None) => return Err(BackendError::NoSize),
                };
                Ok(Backend::Null(NullBackend {
                    capacity_sectors: bytes >> SECTOR_SHIFT,
                }))
            }
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        match self {
            Backend::Uring(u) => u.capacity_sectors,
            Backend::Null(n) => n.capacity_sectors,
        }
    }

    /// The file to register with the ring, if any.
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            Backend::Uring(u) => Some(u.fd()),
            Backend::Null(_) => None,
        }
    }

    /// The buffered twin of [`fd`](Self::fd), if any.
    pub fn alt_fd(&self) -> Option<RawFd> {
        match self {
            Backend::Uring(u) => u.buffered_fd(),
            Backend::Null(_) => None,
        }
    }

    /// The per-queue I/O builder for a queue whose files sit at `fixed` and `alt` in its
    /// ring's table.
    pub fn queue_io(&self, fixed: u32, alt: u32) -> Option<QueueIo> {
        match self {
            Backend::Uring(u) => Some(QueueIo::new(
                fixed,
                u.file.clone(),
                u.buffered.clone().map(|f| (alt, f)),
            )),
            Backend::Null(_) => None,
        }
    }
}
