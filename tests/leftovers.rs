//! `ringvm bench` and `ringvm run` leave nothing behind: no file in $TMPDIR, no RAM-backed
//! disk in /dev/shm, whether they finish, fail, or are stopped by SIGTERM or SIGINT.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{guest, have_kvm};

/// `ringvm bench` locks its cores against a second bench: one at a time.
static BENCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A ringvm command whose temporary directory is a fresh, empty one.
fn ringvm_in(tmp: &Path) -> Command {
    let mut c = common::ringvm();
    c.env("TMPDIR", tmp).env("RINGVM_NO_PROGRESS", "1");
    c
}

fn short_bench(tmp: &Path, runtime: &str) -> Command {
    let mut c = ringvm_in(tmp);
    c.args(["bench", "--rw", "randread", "--bs", "4k", "--qd", "1"])
        .args(["--runtime", runtime, "--disk-size", "64M"]);
    c
}

fn shm_disk(pid: u32) -> PathBuf {
    PathBuf::from(format!("/dev/shm/ringvm-bench-{pid}.img"))
}

/// Whether `path` exists and was made or changed at or after `since`. Old versions of
/// ringvm left `/tmp/ringvm-PID`; a host that ran them has such directories with PIDs
/// that a new child can be given again, and those are not this child's doing.
fn made_since(path: &Path, since: SystemTime) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= since)
}

/// Everything ringvm could have left since `since`: the entries of its $TMPDIR, its
/// /dev/shm disk, the directory old versions made in /tmp.
fn assert_nothing_left(tmp: &Path, pid: u32, since: SystemTime, what: &str) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{what}: left in TMPDIR: {left:?}");
    assert!(
        !shm_disk(pid).exists(),
        "{what}: left {}",
        shm_disk(pid).display()
    );
    assert!(
        !made_since(Path::new(&format!("/tmp/ringvm-{pid}")), since),
        "{what}: left /tmp/ringvm-{pid}"
    );
}

/// A child that is killed and reaped however the test ends.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a bench, waits until its job runs (the disk exists and `settle` has passed),
/// sends `signal`, and returns (exit code, stderr, pid).
fn bench_stopped_by(
    signal: i32,
    settle: Duration,
) -> (Option<i32>, String, u32, tempfile::TempDir, SystemTime) {
    let tmp = tempfile::tempdir().unwrap();
    let since = SystemTime::now();
    let child = short_bench(tmp.path(), "20")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut running = Running(Some(child));
    let start = Instant::now();
    while !shm_disk(pid).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no disk appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(settle);
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe { libc::kill(pid as i32, signal) };
    let child = running.0.take().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr, pid, tmp, since)
}

#[test]
fn test_bench_finished_leaves_nothing() {
    if !have_kvm() {
        return;
    }
    let _serial = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let since = SystemTime::now();
    let child = short_bench(tmp.path(), "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("4k randread qd1"));
    assert_nothing_left(tmp.path(), pid, since, "finished bench");
}

#[test]
fn test_bench_sigterm_mid_run_leaves_nothing() {
    if !have_kvm() {
        return;
    }
    let _serial = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (code, stderr, pid, tmp, since) =
        bench_stopped_by(libc::SIGTERM, Duration::from_millis(1500));
    assert_eq!(code, Some(128 + libc::SIGTERM), "stderr: {stderr}");
    assert!(stderr.contains("interrupted by signal"), "{stderr}");
    assert_nothing_left(tmp.path(), pid, since, "SIGTERM");
}

#[test]
fn test_bench_sigint_mid_run_leaves_nothing() {
    if !have_kvm() {
        return;
    }
    let _serial = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (code, stderr, pid, tmp, since) =
        bench_stopped_by(libc::SIGINT, Duration::from_millis(1500));
    assert_eq!(code, Some(128 + libc::SIGINT), "stderr: {stderr}");
    assert_nothing_left(tmp.path(), pid, since, "SIGINT");
}

#[test]
fn test_bench_sigterm_before_vm_starts_leaves_nothing() {
    if !have_kvm() {
        return;
    }
    let _serial = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // The moment the disk exists: the VM is still being set up.
    let (code, stderr, pid, tmp, since) = bench_stopped_by(libc::SIGTERM, Duration::ZERO);
    assert_eq!(code, Some(128 + libc::SIGTERM), "stderr: {stderr}");
    assert_nothing_left(tmp.path(), pid, since, "early SIGTERM");
}

#[test]
fn test_bench_errors_leave_nothing() {
    if !have_kvm() {
        return;
    }
    let _serial = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // A bad --disk path; a bad --guest, which fails after the default disk was made.
    let cases: [&[&str]; 2] = [
        &["--disk", "/nonexistent/bench.img"],
        &["--guest", "/nonexistent/blkbench"],
    ];
    for extra in cases {
        let tmp = tempfile::tempdir().unwrap();
        let since = SystemTime::now();
        let child = short_bench(tmp.path(), "1")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains("/nonexistent/"), "{extra:?}: {stderr}");
        assert_nothing_left(tmp.path(), pid, since, &format!("error {extra:?}"));
    }
}

#[test]
fn test_run_leaves_nothing_in_tmpdir() {
    if !have_kvm() {
        return;
    }
    let hello = guest("hello");
    let tmp = tempfile::tempdir().unwrap();
    let out = ringvm_in(tmp.path())
        .args(["run", "--kernel"])
        .arg(&hello)
        .args(["--memory", "64M"])
        .output()
        .unwrap();
    assert!(out.status.code().is_some(), "exited");
    let err = ringvm_in(tmp.path())
        .args(["run", "--kernel", "/nonexistent/vmlinux"])
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(1));
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}
