//! blkbench `chaos=1` against ringvm's virtio-blk: malformed chains, buffers outside guest
//! RAM, an avail index that jumps past the queue, queue writes after DRIVER_OK, requests
//! beyond the capacity and writes to a read-only disk. Every case must get an acceptable
//! answer, the device must keep serving (or ask for a reset), and after a reset normal I/O
//! must work again. The cases and their accepted answers: guests/src/bench/chaos.rs.

mod common;

use common::{guest, have_kvm, run};

fn disk(size: u64) -> tempfile::NamedTempFile {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

/// Boots blkbench chaos=1 on `disk_spec`; returns the chaos JSON line and the console.
fn chaos(disk_spec: &str) -> (i32, serde_json::Value, String) {
    let kernel = guest("blkbench");
    let r = run(&[
        "run",
        "--kernel",
        &kernel.to_string_lossy(),
        "--memory",
        "256M",
        "--disk",
        disk_spec,
        "--cmdline",
        "chaos=1",
    ]);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("{\"blkbench_chaos\":"))
        .unwrap_or_else(|| panic!("no chaos line; stdout: {} stderr: {}", r.stdout, r.stderr));
    (r.status, serde_json::from_str(line).unwrap(), r.stdout)
}

fn case<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == name)
        .unwrap_or_else(|| panic!("case {name} missing: {v}"))
}

fn assert_all_pass(status: i32, v: &serde_json::Value, stdout: &str) {
    for c in v["cases"].as_array().unwrap() {
        assert_eq!(c["pass"], true, "case failed: {c}\nconsole:\n{stdout}");
    }
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(status, 1, "blkbench should exit 0 (status 1): {stdout}");
}

#[test]
fn test_chaos_every_hostile_case_answered_and_device_recovers() {
    if !have_kvm() {
        return;
    }
    let d = disk(16 << 20);
    let (status, v, stdout) = chaos(&format!("path={}", d.path().display()));
    assert_all_pass(status, &v, &stdout);
    // The answers ringvm gives (a change here is a behaviour change worth a look).
    for (name, want) in [
        ("data_outside_ram", "ioerr"),
        ("status_outside_ram", "needs_reset"),
        ("desc_loop", "needs_reset"),
        ("indirect_nested", "needs_reset"),
        ("indirect_bad_len", "needs_reset"),
        ("indirect_too_long", "ioerr"),
        ("zero_len_data", "ok"),
        ("status_readonly", "needs_reset"),
        ("unknown_type", "unsupp"),
        ("beyond_capacity", "ioerr"),
        ("straddle_end", "ioerr"),
        ("sector_overflow", "ioerr"),
        ("avail_jump", "needs_reset"),
        ("queue_change_after_driver_ok", "ok"),
        ("write_readonly", "skipped"),
    ] {
        assert_eq!(case(&v, name)["observed"], want, "{name}: {v}");
    }
    assert_eq!(v["passed"], 14, "{v}");
}

#[test]
fn test_chaos_readonly_disk_refuses_writes_with_ioerr() {
    if !have_kvm() {
        return;
    }
    let d = disk(16 << 20);
    let (status, v, stdout) = chaos(&format!("path={},readonly", d.path().display()));
    assert_all_pass(status, &v, &stdout);
    assert_eq!(v["readonly"], true);
    assert_eq!(case(&v, "write_readonly")["observed"], "ioerr", "{v}");
    assert_eq!(v["skipped"], 0, "{v}");
}
