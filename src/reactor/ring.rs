//! Building a reactor's ring: set-up flags, the opcode probe, the sparse fixed-file table
//! and the io_uring restriction.
//!
//! io_uring operations never pass through seccomp (the kernel performs them on the ring's
//! behalf), so the seccomp filter of a reactor thread says nothing about what its ring may
//! do. Unless turned off ([`ReactorOptions::restrict_ring`], off only with `--seccomp off`)
//! the ring is created disabled (IORING_SETUP_R_DISABLED), restricted to the operations the
//! block and net handlers submit and the register operations the reactor makes at run time
//! ([`ring_restrictions`]), then enabled. Anything else — an IORING_OP_OPENAT, a socket, a
//! file-table resize — completes with -EACCES. A kernel that refuses the restriction gets a
//! warning, once, and an unrestricted ring.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, IoUring};

use super::{ReactorOptions, MAX_QUEUES_PER_REACTOR};

/// The SQE opcodes a reactor's ring may carry: what `opcode::` builders in the block and net
/// handlers and the event loop use.
const OPCODES: [(u8, &str); 8] = [
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::ReadFixed::CODE, "READ_FIXED"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    // AsyncCancel2 (by fixed file) is ASYNC_CANCEL with extended flags.
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

/// Register operations after the ring is enabled (uapi `io_uring_register_op`): queue files
/// in and out of the fixed-file table as queues attach and detach, and the lazily registered
/// fixed buffers over guest memory (reactor::buffers).
const IORING_UNREGISTER_BUFFERS: u8 = 1;
const IORING_REGISTER_FILES_UPDATE: u8 = 6;
const IORING_REGISTER_BUFFERS2: u8 = 15;
const IORING_REGISTER_BUFFERS_UPDATE: u8 = 16;
const REGISTER_OPS: [u8; 4] = [
    IORING_UNREGISTER_BUFFERS,
    IORING_REGISTER_FILES_UPDATE,
    IORING_REGISTER_BUFFERS2,
    IORING_REGISTER_BUFFERS_UPDATE,
];

/// The restriction every reactor ring gets: [`OPCODES`], [`REGISTER_OPS`] and, of the SQE
/// flags, only IOSQE_FIXED_FILE (no links, drains or forced async work).
pub fn ring_restrictions() -> Vec<Restriction> {
    let mut r: Vec<Restriction> = OPCODES
        .iter()
        .map(|&(op, _)| Restriction::sqe_op(op))
        .collect();
    r.extend(REGISTER_OPS.iter().map(|&op| Restriction::register_op(op)));
    r.push(Restriction::sqe_flags_allowed(
        squeue::Flags::FIXED_FILE.bits(),
    ));
    r
}

/// Builds a reactor's ring as `opts` asks, checks the kernel has the opcodes the reactors
/// use, lays the sparse fixed-file table (two entries per queue) and, with
/// `opts.restrict_ring`, restricts the ring before enabling it.
pub fn build_ring(opts: &ReactorOptions) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(opts.ring_entries.saturating_mul(4).max(64));
    if opts.sqpoll {
        b.setup_sqpoll(opts.sqpoll_idle_ms);
    } else {
        // One thread submits, and completions wait for its next io_uring_enter: no
        // inter-processor interrupt or forced kernel entry per completion. The kernel
        // flags pending completion work in the SQ ring (TASKRUN_FLAG), so a polling pass
        // enters the kernel only when there is something to submit or to reap.
        b.setup_single_issuer();
        b.setup_taskrun_flag();
        if opts.defer_taskrun {
            b.setup_defer_taskrun();
        } else {
            b.setup_coop_taskrun();
        }
    }
    if opts.restrict_ring {
        b.setup_r_disabled();
    }
    let ring = b.build(opts.ring_entries.max(8))?;
    probe_opcodes(&ring)?;
    ring.submitter()
        .register_files_sparse(2 * MAX_QUEUES_PER_REACTOR as u32)?;
    if opts.restrict_ring {
        if let Err(e) = ring
            .submitter()
            .register_restrictions(&mut ring_restrictions())
        {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                log::warn!("this kernel cannot restrict io_uring rings ({e}); the reactors' rings may run any operation");
            }
        }
        // With SINGLE_ISSUER the enabling thread becomes the ring's only submitter: the
        // reactor builds its ring on its own thread.
        ring.submitter().register_enable_rings()?;
    }
    Ok(ring)
}

/// Fails with a clear message when the kernel lacks an opcode the reactors use.
fn probe_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in OPCODES {
        if !probe.is_supported(code) {
            return Err(io::Error::other(format!(
                "the kernel's io_uring lacks IORING_OP_{name} (Linux 5.19 or newer is needed)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use io_uring::types;

    use super::*;

    fn submit_one(ring: &mut IoUring, e: &squeue::Entry) -> i32 {
        // SAFETY: the entries used here reference only memory that outlives the wait below.
        unsafe { ring.submission().push(e) }.expect("room in the SQ");
        ring.submit_and_wait(1).expect("submit");
        let cqe = ring.completion().next().expect("one completion");
        cqe.result()
    }

    fn restricted() -> IoUring {
        build_ring(&ReactorOptions::default()).expect("ring")
    }

    #[test]
    fn test_restricted_ring_refuses_openat_with_eacces() {
        let mut ring = restricted();
        let path = c"/etc/hostname";
        let e = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        assert_eq!(submit_one(&mut ring, &e), -libc::EACCES);
        let e = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build();
        assert_eq!(submit_one(&mut ring, &e), -libc::EACCES);
    }

    #[test]
    fn test_restricted_ring_runs_listed_ops_and_refuses_other_flags() {
        let mut ring = restricted();
        let file = tempfile::tempfile().unwrap();
        let e = opcode::Fsync::new(types::Fd(file.as_raw_fd())).build();
        assert_eq!(submit_one(&mut ring, &e), 0, "FSYNC is listed");
        let e = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .build()
            .flags(squeue::Flags::IO_LINK);
        assert_eq!(submit_one(&mut ring, &e), -libc::EACCES, "IO_LINK is not");
        // Register operations outside the list are refused too.
        let e = ring
            .submitter()
            .register_files_update(0, &[file.as_raw_fd()]);
        assert!(e.is_ok(), "FILES_UPDATE is listed: {e:?}");
        let e = ring.submitter().unregister_files().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    }

    #[test]
    fn test_ring_restriction_off_runs_unlisted_nop() {
        let mut ring = build_ring(&ReactorOptions {
            restrict_ring: false,
            ..Default::default()
        })
        .unwrap();
        let e = opcode::Nop::new().build();
        assert_eq!(submit_one(&mut ring, &e), 0);
        let mut ring = restricted();
        assert_eq!(
            submit_one(&mut ring, &e),
            -libc::EACCES,
            "NOP is not listed"
        );
    }
}
