//! The allow-lists, one per thread kind. Found by tracing every path the tests and
//! `ringvm bench`/`ringvm run` take (strace -f, then `--seccomp log` with the kernel's audit
//! messages); README "Seccomp" lists what each kind may do and why.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// Rules by system call number; an empty rule list allows the call with any arguments.
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every ringvm thread needs: the allocator (glibc arenas grow with mmap/mprotect and
/// shrink with madvise), futexes (locks, channels), stderr and eventfds (read/write), the
/// clock and sleeps, thread exit (std drops the signal stack: sigaltstack, munmap) and the
/// SIGSYS handler's own write and exit_group.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Calls allowed only without PROT_EXEC in their protection argument (index 2): no thread
/// of ringvm maps code after start-up.
const NO_EXEC: &[i64] = &[libc::SYS_mmap, libc::SYS_mprotect];

/// A reactor: its ring (set up on the thread: io_uring_setup, the ring's shared mappings),
/// io_uring_enter and io_uring_register (file and buffer tables), and `openat`, which is
/// allowed here only so that a second filter can fail it with EACCES (see `openat_fails`);
/// `ioctl` with TUNSETQUEUE only (the net control queue, see `rules`).
const REACTOR: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_openat,
];

/// A vCPU: KVM ioctls (and the tap's TUNSETOFFLOAD when the guest acks net features),
/// eventfds made and cloned for the queues it activates (the device emulation runs on the
/// vCPU that wrote the register), and `openat` as above.
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_openat,
];

/// The control plane once its socket is bound (src/api): the tokio-uring runtime's ring
/// (io_uring_enter; the runtime's own ring is not restricted, README "Seccomp"), tokio's
/// epoll driver and its wake-up eventfd, accepting and shutting down connections, socket
/// I/O outside the ring, the interval log's writes (`write`, in COMMON), and `openat` as
/// for reactors (a second filter fails it with EACCES). Found with `strace -f` over every
/// endpoint, bad requests and a stop (tests/api.rs runs them all under this filter).
const CONTROL: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_openat,
];

/// The vhost-user protocol thread (`ringvm vhost-user-blk`, src/vhost): one front end's
/// socket (accept4, recvmsg with its file descriptors, sendmsg, poll, setsockopt), the
/// memory regions it passes (mmap MAP_SHARED of a memfd/hugetlbfs fd, never executable;
/// fstatfs/statx/readlink to tell hugetlbfs and name the fd), eventfds it passes (write,
/// close), messages to the reactors (futex, write), and `openat` as for reactors. Found
/// with `strace -f` over QEMU 10 front ends on 1 and 2 queues, reconnects and a stop
/// (tests/vhost_user.rs runs them under this filter).
const VHOST: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_dup,
    libc::SYS_openat,
];

/// KVMIO, the type byte of every KVM ioctl.
const KVMIO: u64 = 0xae;
/// TUNSETOFFLOAD (`_IOW('T', 208, unsigned int)`).
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// TUNSETQUEUE (`_IOW('T', 217, int)`): the net control queue (on a reactor) and activation
/// or reset (on a vCPU) attach and detach tap queues as the driver's MQ pair count changes.
const TUNSETQUEUE: u64 = 0x4004_54d9;

/// The main thread, which sets up every VM (`ringvm bench` sets up one per job after its
/// filter is in place), waits for the vCPUs, kicks them (tgkill), reads its signalfd, tears
/// the VM down and writes the reports. Threads it spawns later inherit its filter, so its
/// list also holds every other kind's (see [`rules`]).
const MAIN: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_lseek,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_getdents64,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_ioctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_signalfd4,
    libc::SYS_memfd_create,
    libc::SYS_rt_sigaction,
    libc::SYS_tgkill,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_prctl,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_seccomp,
];

/// The rules of thread kind `kind`.
pub fn rules(kind: ThreadKind) -> Rules {
    let mut r = Rules::new();
    allow(&mut r, COMMON);
    let no_exec = SeccompRule::new(vec![cond(
        2,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )])
    .expect("one condition");
    for &nr in NO_EXEC {
        add(&mut r, nr, vec![no_exec.clone()]);
    }
    match kind {
        ThreadKind::Reactor => {
            allow(&mut r, REACTOR);
            let queue = SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, TUNSETQUEUE)]);
            r.insert(libc::SYS_ioctl, vec![queue.expect("one condition")]);
        }
        ThreadKind::Vcpu => {
            allow(&mut r, VCPU);
            // Only KVM's ioctls, TUNSETOFFLOAD and TUNSETQUEUE: the request (index 1) is 32
            // bits.
            let kvm = SeccompRule::new(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), KVMIO << 8)]);
            let tun = SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, TUNSETOFFLOAD)]);
            let queue = SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, TUNSETQUEUE)]);
            r.insert(
                libc::SYS_ioctl,
                vec![
                    kvm.expect("one condition"),
                    tun.expect("one condition"),
                    queue.expect("one condition"),
                ],
            );
        }
        ThreadKind::Control => {
            allow(&mut r, CONTROL);
            // FIONBIO only (tokio sets sockets non-blocking that way).
            let fionbio = SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::FIONBIO)]);
            r.insert(libc::SYS_ioctl, vec![fionbio.expect("one condition")]);
        }
        ThreadKind::Vhost => allow(&mut r, VHOST),
        ThreadKind::Main => {
            allow(&mut r, MAIN);
            for other in [ThreadKind::Reactor, ThreadKind::Vcpu] {
                for (nr, list) in rules(other) {
                    add(&mut r, nr, list);
                }
            }
        }
    }
    r
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    let len = if arg == 1 {
        SeccompCmpArgLen::Dword
    } else {
        SeccompCmpArgLen::Qword
    };
    SeccompCondition::new(arg, len, op, value).expect("argument index below 6")
}

fn allow(r: &mut Rules, list: &[i64]) {
    for &nr in list {
        add(r, nr, Vec::new());
    }
}

/// Adds `list` to the rules of `nr`: allowed with any arguments if either side allows it
/// unconditionally, else when any rule matches.
fn add(r: &mut Rules, nr: i64, list: Vec<SeccompRule>) {
    match r.get_mut(&nr) {
        None => {
            r.insert(nr, list);
        }
        Some(old) if old.is_empty() => {}
        Some(_) if list.is_empty() => {
            r.insert(nr, Vec::new());
        }
        Some(old) => old.extend(list),
    }
}

/// The second filter of reactors and vCPUs: `openat` fails with EACCES. glibc's allocator
/// opens /proc/sys/vm/overcommit_memory once per process, from whichever thread first
/// shrinks a heap, and reads a failure as "do not shrink"; nothing else on those threads
/// opens files. Stacked filters take the strictest answer, so this beats the allow above.
pub fn openat_fails() -> Rules {
    let mut r = Rules::new();
    r.insert(libc::SYS_openat, Vec::new());
    r.insert(libc::SYS_open, Vec::new());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rules_main_holds_every_other_kind() {
        let main = rules(ThreadKind::Main);
        for kind in [ThreadKind::Reactor, ThreadKind::Vcpu] {
            for nr in rules(kind).keys() {
                assert!(main.contains_key(nr), "{kind:?} allows {nr}, main does not");
            }
        }
        assert!(main[&libc::SYS_ioctl].is_empty(), "main: any ioctl");
    }

    #[test]
    fn test_rules_reactor_lacks_socket_and_exec_and_ioctl_is_tunsetqueue_only() {
        let r = rules(ThreadKind::Reactor);
        assert_eq!(r[&libc::SYS_ioctl].len(), 1, "ioctl: TUNSETQUEUE only");
        for nr in [libc::SYS_socket, libc::SYS_execve, libc::SYS_clone3] {
            assert!(!r.contains_key(&nr), "{nr}");
        }
        assert!(r.contains_key(&libc::SYS_io_uring_enter));
        assert_eq!(r[&libc::SYS_mmap].len(), 1, "mmap only without PROT_EXEC");
    }

    #[test]
    fn test_rules_control_lacks_kvm_exec_and_new_sockets() {
        let r = rules(ThreadKind::Control);
        for nr in [
            libc::SYS_socket,
            libc::SYS_bind,
            libc::SYS_execve,
            libc::SYS_clone3,
            libc::SYS_io_uring_setup,
            libc::SYS_kill,
        ] {
            assert!(!r.contains_key(&nr), "{nr}");
        }
        assert_eq!(r[&libc::SYS_ioctl].len(), 1, "ioctl: FIONBIO only");
        assert!(r.contains_key(&libc::SYS_accept4));
        assert!(r.contains_key(&libc::SYS_epoll_wait));
    }

    #[test]
    fn test_rules_vcpu_ioctl_is_filtered_by_request() {
        let r = rules(ThreadKind::Vcpu);
        assert_eq!(r[&libc::SYS_ioctl].len(), 3);
        assert!(!r.contains_key(&libc::SYS_io_uring_enter));
    }
}
