//! SIGINT/SIGTERM stop the VM, SIGUSR1 prints the statistics so far. The signals are
//! blocked in every thread and read from a signalfd by the main thread, so no handler runs
//! in an arbitrary thread's context.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub enum Event {
    Stop(i32),
    Report,
}

pub struct Signals {
    fd: OwnedFd,
}

/// The signals ringvm handles itself, read from a signalfd.
const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in HANDLED {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread and the threads it spawns
/// later; false if the kernel refused. `main` calls it first thing, so a signal never ends
/// the process by its default action, which would skip the clean-up (`ringvm bench`'s disk
/// in /dev/shm): it stays pending until a VM's [`Signals`] reads it, which stops that VM
/// in order (a signal that arrives between a bench's jobs stops the next job at once).
pub fn block() -> bool {
    let set = handled_set();
    // SAFETY: `set` is initialised; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) == 0 }
}

impl Signals {
    /// Blocks the signals in the calling thread (inherited by threads it spawns later) and
    /// opens a non-blocking signalfd for them, which also sees those already pending.
    /// `None` if the kernel refused.
    pub fn install() -> Option<Signals> {
        if !block() {
            return None;
        }
        let set = handled_set();
        // SAFETY: `set` is initialised; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: signalfd returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Some(Signals { fd })
    }

    /// The next pending signal, if any.
    pub fn poll(&self) -> Option<Event> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`, which is that big.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize != size {
            return None;
        }
        match info.ssi_signo as i32 {
            libc::SIGUSR1 => Some(Event::Report),
            s => Some(Event::Stop(s)),
        }
    }
}
