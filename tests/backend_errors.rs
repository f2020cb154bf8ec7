//! The back end fails under a running guest: EIO from a faulty device (a FUSE file whose bad
//! ranges fail, as device-mapper's `error`/`flakey` targets do; this host's kernel has no
//! device-mapper) and ENOSPC from a full file system. The guest sees VIRTIO_BLK_S_IOERR for
//! exactly the failed requests, every other request and queue keeps being served, the host
//! statistics count the errors, and nothing panics.
//!
//! Needs root (mounts) and, for EIO, Python's `fusepy` over libfuse2 (scripts/test.sh installs
//! both and sets RINGVM_REQUIRE_FUSE=1, which turns a missing piece into a failure).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, have_kvm, run};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn can_run(what: &str) -> bool {
    if !have_kvm() {
        return false;
    }
    if !is_root() {
        eprintln!("SKIP: {what} needs root to mount a file system");
        return false;
    }
    true
}

/// A mount that is undone however the test ends.
struct Mounted {
    dir: tempfile::TempDir,
    server: Option<Child>,
}

impl Mounted {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
        if let Some(s) = &mut self.server {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// A tmpfs of `size` bytes.
fn tmpfs(size: &str) -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "ringvm-enospc",
        ])
        .arg(dir.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs");
    Mounted { dir, server: None }
}

fn have_fusepy() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import fuse"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("RINGVM_REQUIRE_FUSE").is_none(),
            "python3 cannot import fusepy (pip install fusepy; apt-get install libfuse2)"
        );
        eprintln!("SKIP: the EIO test needs Python's fusepy and libfuse2");
    }
    ok
}

/// tests/fixtures/faultyfs.py mounted with a disk.img of `size` bytes whose `bad` byte
/// ranges fail with EIO.
fn faultyfs(backing: &Path, size: u64, bad: &[(u64, u64)]) -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let ranges: Vec<String> = bad.iter().map(|(a, b)| format!("{a}:{b}")).collect();
    let server = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faultyfs.py"))
        .arg(dir.path())
        .arg(backing)
        .arg(size.to_string())
        .arg(ranges.join(","))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let m = Mounted {
        dir,
        server: Some(server),
    };
    let start = Instant::now();
    while !m.path().join(".stats").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "faultyfs did not mount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m
}

fn disk_img(m: &Mounted) -> PathBuf {
    m.path().join("disk.img")
}

/// Runs blkbench on `disk_spec` with `cmdline`; returns (guest result, host stats JSON,
/// stderr). blkbench exits with EXIT_DEVICE_ERROR (3) when it saw errors, 0 otherwise.
fn bench(
    disk_spec: &str,
    cmdline: &str,
    exit_code: u32,
) -> (serde_json::Value, serde_json::Value, String) {
    let stats = tempfile::NamedTempFile::new().unwrap();
    let r = run(&[
        "run",
        "--kernel",
        guest("blkbench").to_str().unwrap(),
        "--memory",
        "128M",
        "--disk",
        disk_spec,
        "--cmdline",
        cmdline,
        "--stats-json",
        stats.path().to_str().unwrap(),
    ]);
    assert_eq!(
        r.status,
        ((exit_code << 1) | 1) as i32,
        "stdout: {} stderr: {}",
        r.stdout,
        r.stderr
    );
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("{\"blkbench\":"))
        .unwrap_or_else(|| panic!("no result line in: {}", r.stdout));
    let guest: serde_json::Value = serde_json::from_str(line).unwrap();
    let host = serde_json::from_str(&std::fs::read_to_string(stats.path()).unwrap()).unwrap();
    (guest, host, r.stderr)
}

/// Per queue of the host statistics: (requests, errors).
fn host_queues(host: &serde_json::Value) -> Vec<(u64, u64)> {
    host["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["requests"].as_u64().unwrap(),
                q["errors"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn test_eio_from_backend_fails_only_those_requests_on_every_queue() {
    if !can_run("the EIO test") || !have_fusepy() {
        return;
    }
    let back = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    const MIB: u64 = 1 << 20;
    // 1 MiB of 32 fails: about 3 % of uniformly random 4 KiB requests.
    let fs = faultyfs(back.path(), 32 * MIB, &[(8 * MIB, 9 * MIB)]);
    let spec = format!("path={},queues=2", disk_img(&fs).display());
    let job = "rw=randrw bs=4k qd=8 queues=2 ios=4000 size=32m seed=3";
    let (g, host, stderr) = bench(&spec, job, 3);
    let errors = u(&g, "errors");
    assert_eq!(u(&g, "ios"), 4000, "every request was answered: {g}");
    assert!(
        errors > 0 && errors < 400,
        "about 3 % of requests fail: {g}"
    );
    let queues = host_queues(&host);
    assert_eq!(queues.len(), 2);
    for (q, (requests, _)) in queues.iter().enumerate() {
        assert!(*requests > 1000, "queue {q} kept serving: {host}");
    }
    assert_eq!(
        queues.iter().map(|q| q.1).sum::<u64>(),
        errors,
        "the host counts each error the guest saw: {host}"
    );
    assert!(stderr.contains("Input/output error"), "{stderr}");
    let fs_stats = std::fs::read_to_string(fs.path().join(".stats")).unwrap();
    let fs_stats: serde_json::Value = serde_json::from_str(&fs_stats).unwrap();
    assert!(
        u(&fs_stats, "read_errors") + u(&fs_stats, "write_errors") >= errors,
        "the errors came from the back end: {fs_stats}"
    );

    // The same disk, the good part only: no error at all.
    let (g, _, _) = bench(&spec, "rw=randrw bs=4k qd=8 queues=2 ios=2000 size=8m", 0);
    assert_eq!(u(&g, "errors"), 0, "{g}");
}

#[test]
fn test_enospc_fails_writes_but_reads_and_old_blocks_keep_working() {
    if !can_run("the ENOSPC test") {
        return;
    }
    let fs = tmpfs("4m");
    let img = fs.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    // tmpfs has no O_DIRECT: direct=off says so instead of relying on the fallback.
    let spec = format!("path={},direct=off,queues=2", img.display());

    // Fill: sequential 64 KiB writes over the whole sparse 32 MiB image; the first ~4 MiB
    // find room, the rest fail.
    let (g, host, stderr) = bench(&spec, "rw=write bs=64k qd=4 queues=2 ios=512 size=32m", 3);
    let errors = u(&g, "errors");
    assert_eq!(u(&g, "ios"), 512, "{g}");
    assert!(
        errors > 256 && errors < 512,
        "writes past the space fail: {g}"
    );
    assert_eq!(host_queues(&host).iter().map(|q| q.1).sum::<u64>(), errors);
    assert!(
        stderr.contains("No space left on device") || stderr.contains("short transfer"),
        "{stderr}"
    );

    // The full file system still serves: reads anywhere (holes read as zeros) and
    // overwrites of blocks that found room, with a verified pattern.
    let (g, _, _) = bench(
        &spec,
        "rw=randwrite bs=4k qd=8 queues=2 ios=2000 size=1m verify=1 seed=5",
        0,
    );
    assert_eq!(
        (u(&g, "errors"), g["verify"].as_str()),
        (0, Some("ok")),
        "{g}"
    );
    let (g, _, _) = bench(
        &spec,
        "rw=randread bs=4k qd=8 queues=2 ios=2000 size=32m",
        0,
    );
    assert_eq!(u(&g, "errors"), 0, "{g}");
}
