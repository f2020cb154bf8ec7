//! The one helper that spawns every ringvm thread: it names the thread, pins it to a core
//! and turns a panic into an orderly VM stop with a message instead of a silent hang.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use super::exit::{ExitHandle, ExitReason};
use crate::seccomp::ThreadFilter;

/// Errors from spawning a ringvm thread.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("Failed to spawn thread {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Pins the calling thread to `core`. Returns false when the kernel refused.
pub fn pin_current(core: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core })
}

/// Spawns a thread called `name`, pinned to `core` when given, that installs `filter` (see
/// crate::seccomp) before it runs `f`. A panic inside `f`, or a filter the kernel refuses,
/// is reported through `exit` as [`ExitReason::ThreadPanic`], which stops the VM.
pub fn spawn<F, T>(
    name: &str,
    core: Option<usize>,
    filter: ThreadFilter,
    exit: ExitHandle,
    f: F,
) -> Result<JoinHandle<Option<T>>, ThreadError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            if let Some(core) = core {
                if !pin_current(core) {
                    log::warn!("{thread_name}: could not pin to core {core}");
                }
            }
            if let Err(e) = filter.apply(&thread_name) {
                exit.request(ExitReason::ThreadPanic {
                    thread: thread_name,
                    message: crate::error::error_chain(&e),
                });
                return None;
            }
            match catch_unwind(AssertUnwindSafe(f)) {
                Ok(v) => Some(v),
                Err(payload) => {
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".to_string());
                    exit.request(ExitReason::ThreadPanic {
                        thread: thread_name,
                        message: msg,
                    });
                    None
                }
            }
        })
        .map_err(|source| ThreadError::Spawn {
            name: name.to_string(),
            source,
        })
}
