//! Seccomp-bpf filters, one allow-list per thread kind (main/control, vCPU, reactor), built
//! with rust-vmm's `seccompiler`.
//!
//! Every thread that [`crate::vmm::thread::spawn`] starts installs its kind's filter before
//! it runs its body; the main thread installs its own once, after the first VM is set up
//! ([`install_main`]). Threads spawned later inherit the main filter on top of their own, so
//! the main list holds every other list. `--seccomp on` (the default) traps a call outside
//! the list: a SIGSYS handler writes one line naming the thread and the call and stops the
//! process with status [`EXIT_FORBIDDEN`]. `--seccomp log` allows the call and has the
//! kernel log it (SECCOMP_RET_LOG: an audit record `type=1326 … syscall=N` in `dmesg`);
//! `--seccomp off` installs nothing. io_uring operations do not pass through seccomp, so the
//! reactors also restrict their rings (crate::reactor::ring).

mod names;
mod rules;

pub use names::name;
pub use rules::{rules, Rules};

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::Once;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Exit status after a forbidden system call: 128 + SIGSYS, what a shell shows for a process
/// that SIGSYS killed.
pub const EXIT_FORBIDDEN: i32 = 128 + libc::SIGSYS;

/// `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Trap calls outside the list and stop with a message.
    #[default]
    On,
    /// Allow them and have the kernel log them.
    Log,
    /// No filter (and no io_uring restriction).
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!("Invalid --seccomp '{s}': expected on, log or off")),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// The kinds of ringvm thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: sets up and tears down VMs, waits, handles signals, reports.
    Main,
    /// A vCPU thread (`vcpuN`): KVM_RUN and the device emulation it drives.
    Vcpu,
    /// An io_uring reactor (`reactorN`).
    Reactor,
    /// The control plane (`api`): the tokio-uring runtime serving `--api-socket`, once its
    /// socket is bound.
    Control,
    /// The vhost-user back end's protocol thread (`vhost-ctl`): accepts a front end, reads
    /// its messages and file descriptors, maps its memory.
    Vhost,
}

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Cannot build the seccomp filter of {kind:?} threads")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("Cannot install the seccomp filter of thread {thread} (--seccomp off runs without)")]
    Install {
        thread: String,
        #[source]
        source: seccompiler::Error,
    },
    #[error("Cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// The compiled filters of one thread (empty under `--seccomp off`).
#[derive(Debug, Clone, Default)]
pub struct ThreadFilter {
    kind: Option<ThreadKind>,
    programs: Vec<BpfProgram>,
}

impl ThreadFilter {
    /// Compiles the filters of `kind` for `mode`.
    pub fn new(kind: ThreadKind, mode: SeccompMode) -> Result<ThreadFilter, SeccompError> {
        let (mismatch, extra) = match mode {
            SeccompMode::Off => return Ok(ThreadFilter::default()),
            SeccompMode::On => (SeccompAction::Trap, kind != ThreadKind::Main),
            SeccompMode::Log => (SeccompAction::Log, false),
        };
        let build = |rules: Rules, mismatch, matched| {
            SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
                .and_then(BpfProgram::try_from)
                .map_err(|source| SeccompError::Build { kind, source })
        };
        // The second filter goes in first: installing one calls prctl(PR_SET_NO_NEW_PRIVS),
        // which the thread's own list does not hold.
        let mut programs = Vec::with_capacity(2);
        if extra {
            programs.push(build(
                rules::openat_fails(),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EACCES as u32),
            )?);
        }
        programs.push(build(rules(kind), mismatch, SeccompAction::Allow)?);
        Ok(ThreadFilter {
            kind: Some(kind),
            programs,
        })
    }

    /// Installs the filters on the calling thread, which `thread` names in the SIGSYS
    /// message. Nothing under `--seccomp off`.
    pub fn apply(&self, thread: &str) -> Result<(), SeccompError> {
        if self.programs.is_empty() {
            return Ok(());
        }
        set_thread_name(thread);
        install_handler()?;
        for p in &self.programs {
            seccompiler::apply_filter(p).map_err(|source| SeccompError::Install {
                thread: thread.to_string(),
                source,
            })?;
        }
        log::debug!(
            "{thread}: seccomp filter of {:?} threads installed",
            self.kind
        );
        Ok(())
    }
}

static MAIN_ONCE: Once = Once::new();

/// Installs the main thread's filter, once per process (a filter cannot be removed, and
/// `ringvm bench` runs one VM after another). Call it on the main thread after set-up.
pub fn install_main(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut result = Ok(());
    MAIN_ONCE.call_once(|| {
        result = ThreadFilter::new(ThreadKind::Main, mode).and_then(|f| f.apply("main"));
    });
    result
}

thread_local! {
    /// The thread's name for the SIGSYS message (const-initialised: the handler reads it
    /// without allocating or locking).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

/// si_code of a SIGSYS that seccomp raised.
const SYS_SECCOMP: i32 = 1;
/// Byte offset of `si_syscall` in a SIGSYS `siginfo_t` on 64-bit Linux (after si_signo,
/// si_errno, si_code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

fn install_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid empty mask and no flags.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act` is initialised and names a handler that only calls
        // async-signal-safe functions; the old action is not asked for.
        if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
            result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

/// A fixed buffer the handler formats its message into.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The message for a forbidden call `nr` made by thread `thread` (NUL-padded).
fn message(thread: &[u8; 16], nr: i64) -> Line {
    let mut l = Line {
        buf: [0; 160],
        len: 0,
    };
    let name_len = thread.iter().position(|&b| b == 0).unwrap_or(16);
    l.push(b"ringvm: seccomp: thread ");
    l.push(if name_len == 0 {
        b"?"
    } else {
        &thread[..name_len]
    });
    l.push(b" made a forbidden system call ");
    l.push_num(nr as u64);
    l.push(b" (");
    l.push(name(nr).as_bytes());
    l.push(b"); stopping (see README \"Seccomp\")\n");
    l
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; its si_code is
    // a plain field.
    let code = unsafe { (*info).si_code };
    let nr = if code == SYS_SECCOMP {
        // SAFETY: for a seccomp SIGSYS the kernel fills the `_sigsys` member, whose int
        // `si_syscall` sits at SI_SYSCALL_OFFSET inside the (128-byte) siginfo_t.
        i64::from(unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read()
        })
    } else {
        -1
    };
    let line = message(&THREAD_NAME.with(Cell::get), nr);
    // SAFETY: write and exit_group are async-signal-safe and allowed by every filter; the
    // buffer lives on this frame.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_exit_group, EXIT_FORBIDDEN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mode_parses_and_rejects_others() {
        assert_eq!("on".parse(), Ok(SeccompMode::On));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        let e = "yes".parse::<SeccompMode>().unwrap_err();
        assert!(e.contains("expected on, log or off"), "{e}");
        assert_eq!(SeccompMode::default(), SeccompMode::On);
    }

    #[test]
    fn test_message_names_thread_and_call() {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(b"reactor1");
        let l = message(&t, libc::SYS_socket);
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "ringvm: seccomp: thread reactor1 made a forbidden system call 41 (socket); \
             stopping (see README \"Seccomp\")\n"
        );
    }

    #[test]
    fn test_every_kind_compiles_in_every_mode() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Reactor,
            ThreadKind::Control,
            ThreadKind::Vhost,
        ] {
            assert_eq!(
                ThreadFilter::new(kind, SeccompMode::On)
                    .unwrap()
                    .programs
                    .len(),
                {
                    if kind == ThreadKind::Main {
                        1
                    } else {
                        2
                    }
                }
            );
            assert_eq!(
                ThreadFilter::new(kind, SeccompMode::Log)
                    .unwrap()
                    .programs
                    .len(),
                1
            );
            assert!(ThreadFilter::new(kind, SeccompMode::Off)
                .unwrap()
                .programs
                .is_empty());
        }
    }
}
