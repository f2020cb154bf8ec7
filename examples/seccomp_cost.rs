//! What a thread's seccomp filter adds to one system call: 2 M calls of io_uring_enter
//! (reactor filter) and of ioctl(KVM_RUN) (vCPU filter, whose ioctl rule checks the
//! request) on fd -1, each in a fresh thread with and without the filter, best of 7
//! interleaved rounds. perf/RESULTS.md "seccomp A/B" quotes it.
//!
//! `cargo run --release --example seccomp_cost` (pin it: `taskset -c 1 …`).

use std::time::Instant;

use ringvm::seccomp::{SeccompMode, ThreadFilter, ThreadKind};

const CALLS: u32 = 2_000_000;
const ROUNDS: usize = 7;

/// ns per call of `nr(-1, arg1)` in a new thread under `kind`'s filter (none: `None`).
fn ns_per_call(kind: Option<ThreadKind>, nr: i64, arg1: u64) -> f64 {
    std::thread::spawn(move || {
        if let Some(k) = kind {
            let f = ThreadFilter::new(k, SeccompMode::On).expect("filter");
            f.apply("cost").expect("install");
        }
        let t = Instant::now();
        for _ in 0..CALLS {
            // SAFETY: fd -1 makes both calls fail with EBADF before touching any pointer.
            unsafe { libc::syscall(nr, -1i64, arg1, 0u64, 0u64, 0u64, 0u64) };
        }
        t.elapsed().as_nanos() as f64 / f64::from(CALLS)
    })
    .join()
    .expect("thread")
}

fn main() {
    let cases = [
        (
            "io_uring_enter, reactor",
            ThreadKind::Reactor,
            libc::SYS_io_uring_enter,
            0,
        ),
        (
            "ioctl(KVM_RUN), vCPU",
            ThreadKind::Vcpu,
            libc::SYS_ioctl,
            0xae80,
        ),
    ];
    let mut best = [[f64::MAX; 2]; 2];
    for _ in 0..ROUNDS {
        for (i, &(_, kind, nr, arg)) in cases.iter().enumerate() {
            best[i][0] = best[i][0].min(ns_per_call(None, nr, arg));
            best[i][1] = best[i][1].min(ns_per_call(Some(kind), nr, arg));
        }
    }
    for (i, (name, ..)) in cases.iter().enumerate() {
        let [off, on] = best[i];
        println!(
            "{name}: {off:.1} ns without, {on:.1} ns with the filter (+{:.1} ns)",
            on - off
        );
    }
}
