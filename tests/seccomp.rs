//! Seccomp: a thread making a call outside its kind's list is stopped with a message naming
//! the call; every thread of a running VM carries its filters; a VM with disk and net and a
//! full `ringvm bench` run with the filters on; `--seccomp off` and a bad value.
//!
//! The forbidden calls are made in a child: this test binary runs itself again with
//! `CHILD` set, which makes one of the ignored `child_*` functions below do the act.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{guest, have_kvm, ringvm, run};
use ringvm::reactor::{QueueHandler, ReactorOptions, ReactorPool};
use ringvm::seccomp::{SeccompMode, ThreadFilter, ThreadKind, EXIT_FORBIDDEN};
use ringvm::vmm::exit::ExitHandle;
use ringvm::vmm::thread;

const CHILD: &str = "RINGVM_SECCOMP_TEST_CHILD";

/// `ringvm bench` locks its cores against a second bench: run those tests one at a time.
static BENCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the ignored test `name` of this binary in a child; returns (status, stderr).
fn child(name: &str) -> (i32, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

#[test]
#[ignore = "run by test_reactor_forbidden_syscall_stops_with_message in a child"]
fn child_reactor_opens_a_socket() {
    assert!(in_child(), "only as a child");
    let pool = ReactorPool::start(
        ReactorOptions {
            seccomp: SeccompMode::On,
            ..Default::default()
        },
        ExitHandle::new().unwrap(),
    )
    .unwrap();
    // The factory runs on the reactor thread, under its filter.
    let r = pool.handle().attach(
        0,
        1,
        Box::new(|_| {
            // SAFETY: socket(2) takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            Err::<Box<dyn QueueHandler>, _>(format!("socket returned {fd}"))
        }),
    );
    panic!("the reactor survived its socket call: {r:?}");
}

#[test]
fn test_reactor_forbidden_syscall_stops_with_message() {
    let (status, stderr) = child("child_reactor_opens_a_socket");
    assert_eq!(status, EXIT_FORBIDDEN, "stderr: {stderr}");
    assert!(
        stderr.contains(
            "ringvm: seccomp: thread reactor0 made a forbidden system call 41 (socket); stopping"
        ),
        "stderr: {stderr}"
    );
}

/// A thread of `kind` named `name` runs `act` under its filter; the child then exits 0.
fn in_filtered_thread(kind: ThreadKind, name: &str, act: fn()) {
    let exit = ExitHandle::new().unwrap();
    let filter = ThreadFilter::new(kind, SeccompMode::On).unwrap();
    let h = thread::spawn(name, None, filter, exit, act).unwrap();
    assert_eq!(h.join().unwrap(), Some(()));
}

#[test]
#[ignore = "run by test_vcpu_non_kvm_ioctl_stops_with_message in a child"]
fn child_vcpu_asks_terminal_size() {
    assert!(in_child(), "only as a child");
    in_filtered_thread(ThreadKind::Vcpu, "vcpu3", || {
        // SAFETY: winsize is plain data.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
        unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    });
}

#[test]
fn test_vcpu_non_kvm_ioctl_stops_with_message() {
    let (status, stderr) = child("child_vcpu_asks_terminal_size");
    assert_eq!(status, EXIT_FORBIDDEN, "stderr: {stderr}");
    assert!(
        stderr.contains("thread vcpu3 made a forbidden system call 16 (ioctl)"),
        "stderr: {stderr}"
    );
}

#[test]
#[ignore = "run by test_reactor_openat_fails_with_eacces_and_allowed_calls_work in a child"]
fn child_reactor_opens_a_file_and_allocates() {
    assert!(in_child(), "only as a child");
    in_filtered_thread(ThreadKind::Reactor, "reactor5", || {
        let e = std::fs::File::open("/proc/self/status").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        let v: Vec<u8> = vec![7; 1 << 20]; // the allocator's own mmap
        assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 7 << 20);
        eprintln!("reactor5 still runs");
    });
}

#[test]
fn test_reactor_openat_fails_with_eacces_and_allowed_calls_work() {
    let (status, stderr) = child("child_reactor_opens_a_file_and_allocates");
    assert_eq!(status, 0, "stderr: {stderr}");
    assert!(stderr.contains("reactor5 still runs"), "stderr: {stderr}");
}

#[test]
fn test_seccomp_bad_value_is_a_clear_error() {
    let r = ringvm()
        .args(["run", "--kernel", "/nonexistent", "--seccomp", "yes"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Invalid --seccomp 'yes': expected on, log or off"),
        "{stderr}"
    );
}

fn disk(size: u64) -> tempfile::NamedTempFile {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

/// (thread name, filters installed) of every thread of `pid`.
fn filters(pid: u32) -> Vec<(String, u32)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let p = e.ok()?.path();
        let comm = std::fs::read_to_string(p.join("comm")).ok()?;
        let status = std::fs::read_to_string(p.join("status")).ok()?;
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))?
            .trim()
            .parse()
            .ok()?;
        Some((comm.trim().to_string(), n))
    })
    .collect()
}

/// Runs blkbench on a disk under `ringvm run --seccomp mode`, samples the threads' filter
/// counts while it runs, and checks that it finished its I/O.
fn run_blkbench(mode: &str) -> Vec<(String, u32)> {
    let d = disk(32 << 20);
    let kernel = guest("blkbench").to_string_lossy().into_owned();
    let spec = format!("path={}", d.path().display());
    let mut c = ringvm()
        .args([
            "run", "--kernel", &kernel, "--memory", "64M", "--disk", &spec,
        ])
        .args([
            "--cmdline",
            "rw=randwrite bs=4k qd=4 runtime=1.5 size=16m verify=1",
        ])
        .args(["--seccomp", mode, "--stats-json"])
        .arg(d.path().with_extension("json"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < Duration::from_secs(60) {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        let now = filters(c.id());
        if now.iter().any(|(n, _)| n.starts_with("vcpu")) {
            seen = now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = c.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("\"verify\":\"ok\""), "{stdout}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    let json = std::fs::read_to_string(d.path().with_extension("json")).unwrap();
    let _ = std::fs::remove_file(d.path().with_extension("json"));
    assert!(json.contains("\"requests\""), "{json}");
    seen
}

#[test]
fn test_run_with_disk_every_thread_filtered_and_guest_passes() {
    if !have_kvm() {
        return;
    }
    let seen = run_blkbench("on");
    let count = |prefix: &str| seen.iter().filter(|(n, _)| n.starts_with(prefix)).count();
    assert!(count("vcpu") >= 1 && count("reactor") >= 1, "{seen:?}");
    for (name, n) in &seen {
        // Main ("ringvm"): its own. vCPUs and reactors: their kind's list and the openat
        // filter (a later VM's threads would carry main's too). Threads the kernel adds
        // (io_uring's iou-wrk-N, KVM's kvm-nx-lpage-recovery) run no user code.
        let want = match name.as_str() {
            "ringvm" => 1,
            n if n.starts_with("vcpu") || n.starts_with("reactor") => 2,
            _ => continue,
        };
        assert_eq!(*n, want, "thread {name}: {seen:?}");
    }
    assert!(seen.iter().any(|(n, _)| n == "ringvm"), "{seen:?}");
}

#[test]
fn test_run_with_seccomp_off_installs_nothing() {
    if !have_kvm() {
        return;
    }
    let seen = run_blkbench("off");
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|(_, n)| *n == 0), "{seen:?}");
}

#[test]
fn test_bench_matrix_passes_with_seccomp_on() {
    if !have_kvm() {
        return;
    }
    let _g = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("b.json");
    let hlog = dir.path().join("b");
    let r = run(&[
        "bench",
        "--runtime",
        "0.3",
        "--disk-size",
        "64M",
        "--json",
        json.to_str().unwrap(),
        "--hlog",
        hlog.to_str().unwrap(),
    ]);
    assert_eq!(r.status, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("seccomp"), "{}", r.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 4, "the default matrix");
    // The hlog of the last job was written after the main filter went in.
    assert!(dir.path().join("b.4.hlog").exists());
}

/// Samples the filters of `c`'s threads until `ready` holds for a sample (or 30 s pass).
fn sample_until(
    c: &mut std::process::Child,
    ready: impl Fn(&[(String, u32)]) -> bool,
) -> Vec<(String, u32)> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        let now = filters(c.id());
        if ready(&now) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Vec::new()
}

#[test]
fn test_run_with_api_socket_api_thread_filtered_and_answers() {
    if !have_kvm() {
        return;
    }
    let d = disk(32 << 20);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = guest("blkbench").to_string_lossy().into_owned();
    let mut c = ringvm()
        .args(["run", "--kernel", &kernel, "--memory", "64M", "--disk"])
        .arg(format!("path={}", d.path().display()))
        .args([
            "--cmdline",
            "rw=randread bs=4k qd=1 runtime=3",
            "--api-socket",
        ])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = sample_until(&mut c, |t| {
        t.iter().any(|(n, _)| n == "api") && t.iter().any(|(n, _)| n.starts_with("vcpu"))
    });
    // The socket answers under the filter (GET /vm through a plain HTTP/1.1 request).
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let out = c.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    let api = seen.iter().find(|(n, _)| n == "api");
    assert_eq!(
        api.map(|a| a.1),
        Some(2),
        "api: Control list + openat filter: {seen:?}"
    );
}

/// Starts `ringvm vhost-user-blk --seccomp mode` and returns its threads' filter counts.
fn vhost_filters(mode: &str) -> Vec<(String, u32)> {
    let d = disk(16 << 20);
    let dir = tempfile::tempdir().unwrap();
    let mut c = ringvm()
        .args(["vhost-user-blk", "--socket"])
        .arg(dir.path().join("vu.sock"))
        .arg("--disk")
        .arg(format!("path={}", d.path().display()))
        .args(["--io-cores", "1", "--seccomp", mode])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = sample_until(&mut c, |t| {
        t.iter().any(|(n, _)| n == "vhost-ctl") && t.iter().any(|(n, _)| n == "reactor0")
    });
    let _ = c.kill();
    let _ = c.wait();
    seen
}

#[test]
fn test_vhost_user_blk_reactor_and_protocol_thread_filtered() {
    let on = vhost_filters("on");
    for name in ["vhost-ctl", "reactor0"] {
        let n = on.iter().find(|(t, _)| t == name).map(|t| t.1);
        assert_eq!(n, Some(2), "{name}: {on:?}");
    }
    let off = vhost_filters("off");
    assert!(
        !off.is_empty() && off.iter().all(|(_, n)| *n == 0),
        "{off:?}"
    );
}
