//! ringvm as a vhost-user-blk back end (`ringvm vhost-user-blk --socket PATH --disk SPEC`).
//!
//! A front end (QEMU's `vhost-user-blk-pci`, Cloud Hypervisor's `--disk vhost_user=true`)
//! connects to a Unix socket and drives the disk's virtqueues over the vhost-user protocol;
//! the queues are served by ringvm's pinned io_uring reactors exactly as a ringvm guest's are:
//! kicks are the eventfds the front end passes, completions write its call eventfds, and
//! guest memory is mapped from the file descriptors of SET_MEM_TABLE ([`memory`]).
//!
//! Threads: the protocol runs on one control thread (`vhost-ctl`), which accepts one front end
//! at a time and answers its messages ([`blk::VhostBlk`] through rust-vmm's `vhost` crate,
//! which parses the messages and passes the file descriptors). The data path never sees the
//! control thread: a queue is handed to its reactor by message and taken back by message.
//! The `vhost-user-backend` crate is not used: it owns each queue in a `Vring`
//! (`Arc<RwLock<…>>`) and serves it from its own epoll worker threads, which is the opposite
//! of a reactor that owns its queues and polls them through its ring.
//!
//! A malformed or hostile message ends the connection with a logged reason; the queues of
//! that front end are stopped (their requests in flight completed first), and the back end
//! waits for the next front end with the same disk.

pub mod blk;
pub mod memory;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VuError};

pub use blk::VhostBlk;

use crate::vmm::exit::ExitHandle;

/// How long one message may take to arrive once its first byte did; a front end that stalls
/// inside a message is disconnected.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the vhost-user server.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("Socket {path} is in use by a running back end")]
    InUse { path: String },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: String },
    #[error("Cannot listen on {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot accept a front end")]
    Accept(#[source] std::io::Error),
}

/// Binds `path`, replacing a stale socket that nobody listens on (a back end that died).
pub fn bind(path: &Path) -> Result<UnixListener, VhostError> {
    let p = path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(VhostError::NotASocket { path: p });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(VhostError::InUse { path: p });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| VhostError::Bind { path: p, source })
}

/// Waits until `fd` is readable or a stop was requested; true when readable.
fn readable(fd: BorrowedFd<'_>, exit: &ExitHandle) -> bool {
    let mut pfds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: exit.eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if exit.is_requested() {
            return false;
        }
        // SAFETY: `pfds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 1000) };
        if n > 0 && pfds[0].revents != 0 {
            return !exit.is_requested();
        }
    }
}

/// Serves front ends on `listener`, one at a time, until `exit` is requested (or, with
/// `once`, until the first front end disconnects).
pub fn serve(
    listener: UnixListener,
    session: Arc<Mutex<VhostBlk>>,
    exit: ExitHandle,
    once: bool,
) -> Result<(), VhostError> {
    while readable(listener.as_fd(), &exit) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VhostError::Accept(e)),
        };
        log::info!("vhost-user: front end connected");
        serve_connection(stream, &session, &exit);
        let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
        s.disconnect();
        if once {
            break;
        }
        log::info!("vhost-user: {}: waiting for a front end", s.device().name());
    }
    Ok(())
}

fn serve_connection(stream: UnixStream, session: &Arc<Mutex<VhostBlk>>, exit: &ExitHandle) {
    if let Err(e) = stream.set_read_timeout(Some(MESSAGE_TIMEOUT)) {
        log::warn!("vhost-user: cannot set a read timeout on the connection: {e}");
    }
    let fd = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::error!("vhost-user: cannot duplicate the connection: {e}");
            return;
        }
    };
    let mut handler = BackendReqHandler::from_stream(stream, session.clone());
    while readable(fd.as_fd(), exit) {
        match handler.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) => {
                log::info!("vhost-user: front end disconnected");
                return;
            }
            Err(e) => {
                log::warn!("vhost-user: closing the connection: {e}");
                return;
            }
        }
    }
}
