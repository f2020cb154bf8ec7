//! End to end: the blkbench guest drives ringvm's virtio-blk through the io_uring reactors,
//! writes a verifiable pattern, reads it back and checks it; plus the guest's and the
//! VMM's handling of bad parameters and bad disks.

mod common;

use common::{guest, have_kvm, run};

/// `ringvm bench` locks its cores against a second bench: run those tests one at a time.
static BENCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn blkbench() -> String {
    guest("blkbench").to_string_lossy().into_owned()
}

/// A disk file on a filesystem that supports O_DIRECT (the target dir, not tmpfs).
fn disk(size: u64) -> tempfile::NamedTempFile {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

fn result_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"blkbench\":"))
        .unwrap_or_else(|| panic!("no result line in: {stdout}"));
    serde_json::from_str(line).unwrap()
}

fn bench(disk_spec: &str, cmdline: &str) -> (i32, serde_json::Value, String) {
    let r = run(&[
        "run",
        "--kernel",
        &blkbench(),
        "--memory",
        "256M",
        "--disk",
        disk_spec,
        "--cmdline",
        cmdline,
    ]);
    assert_eq!(
        r.status, 1,
        "blkbench should exit 0 (status 1); stdout: {} stderr: {}",
        r.stdout, r.stderr
    );
    (r.status, result_line(&r.stdout), r.stderr)
}

fn write_then_verify(queues: u32) {
    let d = disk(64 << 20);
    let spec = format!("path={},queues={queues}", d.path().display());
    let common = format!("bs=4k qd=8 queues={queues} ios=4000 size=16m verify=1 seed={queues}");
    let (_, w, stderr) = bench(&spec, &format!("rw=randwrite {common}"));
    assert_eq!(w["verify"], "ok");
    assert_eq!(w["errors"], 0);
    assert_eq!(w["writes"], 4000);
    // The host's per-queue table lists every queue the guest used.
    for q in 0..queues {
        assert!(
            stderr
                .lines()
                .any(|l| l.split_whitespace().take(2).collect::<Vec<_>>()
                    == ["blk0", &q.to_string()]),
            "queue {q} missing from: {stderr}"
        );
    }
    let (_, r, _) = bench(&spec, &format!("rw=randread {common}"));
    assert_eq!(r["verify"], "ok");
    assert!(
        r["verify_sectors"].as_u64().unwrap() > 0,
        "reads checked stamped blocks: {r}"
    );
    assert_eq!(r["errors"], 0);
}

#[test]
fn test_blkbench_write_read_verify_one_queue() {
    if have_kvm() {
        write_then_verify(1);
    }
}

#[test]
fn test_blkbench_write_read_verify_two_queues() {
    if have_kvm() {
        write_then_verify(2);
    }
}

#[test]
fn test_blkbench_write_read_verify_four_queues() {
    if have_kvm() {
        write_then_verify(4);
    }
}

#[test]
fn test_blkbench_null_backend_completes_all_requests() {
    if !have_kvm() {
        return;
    }
    let (_, r, _) = bench(
        "backend=null,size=64M,queues=2",
        "rw=randrw bs=4k qd=16 queues=2 ios=20000",
    );
    assert_eq!(r["ios"], 20000);
    assert_eq!(r["errors"], 0);
}

#[test]
fn test_blkbench_flush_and_sequential_mix() {
    if !have_kvm() {
        return;
    }
    let d = disk(32 << 20);
    let spec = format!("path={},direct=off", d.path().display());
    let (_, r, _) = bench(&spec, "rw=write bs=128k qd=4 ios=400 flush_every=16");
    assert!(r["flushes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors"], 0);
}

#[test]
fn test_blkbench_readonly_disk_fails_writes() {
    if !have_kvm() {
        return;
    }
    let d = disk(16 << 20);
    let spec = format!("path={},readonly", d.path().display());
    // The guest sees VIRTIO_BLK_F_RO and refuses the job (the device answering writes with
    // IOERR is covered by the device's unit tests); reads still work.
    let r = run(&[
        "run",
        "--kernel",
        &blkbench(),
        "--memory",
        "256M",
        "--disk",
        &spec,
        "--cmdline",
        "rw=randwrite ios=100",
    ]);
    assert_eq!(r.status, (5 << 1) | 1, "stdout: {}", r.stdout);
    assert!(r.stdout.contains("read-only"), "stdout: {}", r.stdout);
    let (_, v, _) = bench(&spec, "rw=randread ios=100");
    assert_eq!(v["errors"], 0);
}

fn expect_bad_param(cmdline: &str, name: &str) {
    let d = disk(16 << 20);
    let spec = format!("path={},queues=2", d.path().display());
    let r = run(&[
        "run",
        "--kernel",
        &blkbench(),
        "--memory",
        "256M",
        "--disk",
        &spec,
        "--cmdline",
        cmdline,
    ]);
    assert_eq!(
        r.status,
        (5 << 1) | 1,
        "bad parameter exit code for '{cmdline}'; stdout: {}",
        r.stdout
    );
    assert!(
        r.stdout.contains(name),
        "message should name '{name}': {}",
        r.stdout
    );
}

macro_rules! bad_param_test {
    ($name:ident, $cmdline:expr, $param:expr) => {
        #[test]
        fn $name() {
            if have_kvm() {
                expect_bad_param($cmdline, $param);
            }
        }
    };
}

bad_param_test!(test_blkbench_bad_block_size_named, "bs=3", "bs");
bad_param_test!(test_blkbench_zero_queue_depth_named, "qd=0", "qd");
bad_param_test!(
    test_blkbench_more_queues_than_offered_named,
    "queues=3",
    "queues"
);
bad_param_test!(test_blkbench_unknown_key_named, "nosuchkey=1", "nosuchkey");
bad_param_test!(test_blkbench_unknown_workload_named, "rw=sideways", "rw");
bad_param_test!(
    test_blkbench_working_set_beyond_disk_named,
    "size=1t",
    "size"
);
bad_param_test!(test_blkbench_bad_number_named, "runtime=xyz", "runtime");

#[test]
fn test_disk_that_cannot_be_opened_is_a_startup_error() {
    if !have_kvm() {
        return;
    }
    let r = run(&[
        "run",
        "--kernel",
        &blkbench(),
        "--disk",
        "path=/nonexistent/disk.img",
    ]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("/nonexistent/disk.img"),
        "stderr: {}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
}

#[test]
fn test_bad_disk_option_is_a_config_error() {
    let r = run(&[
        "run",
        "--kernel",
        &blkbench(),
        "--disk",
        "path=x,queues=banana",
    ]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("queues"), "stderr: {}", r.stderr);
}

#[test]
fn test_bench_command_single_job_prints_table_and_json() {
    if !have_kvm() {
        return;
    }
    let _serial = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let json = tempfile::NamedTempFile::new().unwrap();
    let r = run(&[
        "bench",
        "--rw",
        "randread",
        "--qd",
        "4",
        "--runtime",
        "0.5",
        "--disk-size",
        "64M",
        "--json",
        json.path().to_str().unwrap(),
    ]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert!(r.stdout.contains("4k randread qd4"), "stdout: {}", r.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json.path()).unwrap()).unwrap();
    let job = &v["jobs"][0];
    assert!(job["guest"]["ios"].as_u64().unwrap() > 0);
    assert!(job["host"]["queues"][0]["requests"].as_u64().unwrap() > 0);
}

#[test]
fn test_bench_missing_disk_is_named() {
    if !have_kvm() {
        return;
    }
    let _serial = BENCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let r = run(&[
        "bench",
        "--disk",
        "/nonexistent/bench.img",
        "--runtime",
        "0.5",
        "--qd",
        "1",
    ]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("/nonexistent/bench.img"),
        "stderr: {}",
        r.stderr
    );
}

#[test]
fn test_run_writes_stats_json_and_hlog() {
    if !have_kvm() {
        return;
    }
    let json = tempfile::NamedTempFile::new().unwrap();
    let hlog = tempfile::NamedTempFile::new().unwrap();
    let r = run(&[
        "run",
        "--kernel",
        &blkbench(),
        "--memory",
        "64M",
        "--disk",
        "backend=null,size=16M,queues=2",
        "--cmdline",
        "rw=randread qd=4 queues=2 ios=2000",
        "--stats-json",
        json.path().to_str().unwrap(),
        "--hlog",
        hlog.path().to_str().unwrap(),
    ]);
    assert_eq!(r.status, 1, "stderr: {}", r.stderr);
    // The exit table has the percentile columns and one row per queue.
    assert!(r.stderr.contains("p99.9"), "stderr: {}", r.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json.path()).unwrap()).unwrap();
    let queues = v["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2);
    let total: u64 = queues.iter().map(|q| q["requests"].as_u64().unwrap()).sum();
    assert_eq!(total, 2000, "every guest request is counted once: {v}");
    // The full distribution is there: bucket counts add up to the requests.
    let in_buckets: u64 = queues
        .iter()
        .flat_map(|q| {
            q["service_ns"]["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b[1].as_u64().unwrap())
        })
        .sum();
    assert_eq!(in_buckets, 2000);
    let log = std::fs::read_to_string(hlog.path()).unwrap();
    assert!(
        log.contains("Tag=blk") || log.contains("Tag="),
        "tagged intervals: {log}"
    );
    assert!(
        log.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('"'))
            .count()
            >= 2,
        "{log}"
    );
}

#[test]
fn test_sigusr1_prints_statistics_while_running() {
    if !have_kvm() {
        return;
    }
    let child = common::ringvm()
        .args([
            "run",
            "--kernel",
            &blkbench(),
            "--memory",
            "64M",
            "--disk",
            "backend=null,size=16M",
            "--cmdline",
            "rw=randread qd=2 runtime=30",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    std::thread::sleep(std::time::Duration::from_millis(600));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Once on SIGUSR1 while running, once at exit.
    assert_eq!(err.matches("busy ns/request").count(), 2, "stderr: {err}");
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
}
