//! How a running VM asks to stop: any thread (a vCPU on the exit port, a reactor that
//! panicked, the signal handler) records an [`ExitReason`] and wakes the main thread.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote `code` to the isa-debug-exit port; the process exits with `(code << 1) | 1`.
    DebugExit { code: u32 },
    /// The guest asked for a reset through the i8042 controller (port 0x64, value 0xfe).
    Reset,
    /// The guest powered off through the ACPI sleep control register (SLP_TYP S5 + SLP_EN).
    PowerOff,
    /// KVM reported a shutdown (triple fault) on a vCPU.
    Shutdown { vcpu: usize },
    /// Every vCPU halted with interrupts disabled: the guest can never run again.
    AllHalted,
    /// A vCPU stopped on an exit ringvm cannot handle.
    VcpuError { vcpu: usize, message: String },
    /// A device model reported an unrecoverable error.
    DeviceError { message: String },
    /// A ringvm thread panicked.
    ThreadPanic { thread: String, message: String },
    /// The user interrupted ringvm (SIGINT/SIGTERM).
    Signal { signal: i32 },
    /// A client asked for a stop through the API socket (`PUT /vm/stop`): the same
    /// orderly stop as SIGTERM, with the same exit status.
    ApiStop,
}

impl ExitReason {
    /// The process exit status this reason maps to.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::DebugExit { code } => ((code << 1) | 1) as i32 & 0xff,
            ExitReason::Reset | ExitReason::PowerOff => 0,
            ExitReason::Signal { signal } => 128 + signal,
            ExitReason::ApiStop => 128 + libc::SIGTERM,
            _ => 2,
        }
    }

    /// A one-line description for the user.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::DebugExit { code } => {
                format!("guest exited through the debug-exit port with code {code}")
            }
            ExitReason::Reset => "guest requested a reset (i8042)".to_string(),
            ExitReason::PowerOff => "guest powered off (ACPI S5)".to_string(),
            ExitReason::Shutdown { vcpu } => format!("vCPU {vcpu} shut down (triple fault)"),
            ExitReason::AllHalted => "all vCPUs halted with interrupts disabled".to_string(),
            ExitReason::VcpuError { vcpu, message } => format!("vCPU {vcpu} stopped: {message}"),
            ExitReason::DeviceError { message } => format!("device error: {message}"),
            ExitReason::ThreadPanic { thread, message } => {
                format!("thread {thread} panicked: {message}")
            }
            ExitReason::Signal { signal } => format!("interrupted by signal {signal}"),
            ExitReason::ApiStop => "stopped through the API socket (PUT /vm/stop)".to_string(),
        }
    }
}

struct Inner {
    reason: Mutex<Option<ExitReason>>,
    wake: EventFd,
}

/// A cloneable handle that any thread uses to stop the VM.
#[derive(Clone)]
pub struct ExitHandle(Arc<Inner>);

impl ExitHandle {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitHandle(Arc::new(Inner {
            reason: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })))
    }

    /// Records `reason` (if none was recorded before) and wakes the waiter.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        let _ = self.0.wake.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.0
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_requested(&self) -> bool {
        self.reason().is_some()
    }

    /// The eventfd that becomes readable once a stop was requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.0.wake
    }

    /// Blocks until a stop is requested and returns its reason.
    pub fn wait(&self) -> ExitReason {
        loop {
            if let Some(r) = self.wait_timeout(std::time::Duration::from_millis(100)) {
                return r;
            }
        }
    }

    /// Waits up to `timeout` for a stop request.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<ExitReason> {
        if let Some(r) = self.reason() {
            return Some(r);
        }
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.0.wake),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        let _ = self.0.wake.read();
        self.reason()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_debug_exit_status_matches_qemu() {
        assert_eq!(ExitReason::DebugExit { code: 0 }.status(), 1);
        assert_eq!(ExitReason::DebugExit { code: 3 }.status(), 7);
    }

    #[test]
    fn test_first_reason_wins() {
        let h = ExitHandle::new().unwrap();
        h.request(ExitReason::Reset);
        h.request(ExitReason::AllHalted);
        assert_eq!(h.wait(), ExitReason::Reset);
    }
}
