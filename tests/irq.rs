//! blkbench irq=1 under ringvm: each queue's MSI-X vector into the guest's ring-0 handler,
//! ring 3 waiting for the handler's flag. A stamped write pass and a verifying read pass on
//! one and two queues, the interrupt path's numbers in the JSON, and `ringvm bench --irq`.

mod common;

use common::{guest, have_kvm, run};

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

/// Runs blkbench under `ringvm run`; returns its result and the host's interrupts sent per
/// queue (from `--stats-json`).
fn blkbench(disk_spec: &str, cmdline: &str) -> (serde_json::Value, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let r = run(&[
        "run",
        "--kernel",
        &guest("blkbench").to_string_lossy(),
        "--memory",
        "256M",
        "--disk",
        disk_spec,
        "--cmdline",
        cmdline,
        "--stats-json",
        &stats.to_string_lossy(),
    ]);
    assert_eq!(
        r.status, 1,
        "blkbench should exit 0 (status 1); stdout: {} stderr: {}",
        r.stdout, r.stderr
    );
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let sent = stats["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no queues in {stats}"))
        .iter()
        .map(|q| q["irqs_sent"].as_u64().unwrap())
        .collect();
    (result_line(&r.stdout), sent)
}

/// The irq object's invariants for a run of `ios` requests on `queues` queues.
fn check_irq(r: &serde_json::Value, ios: u64, host_sent: &[u64], queues: usize) {
    assert_eq!(r["params"]["irq"], 1, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let irq = &r["irq"];
    let interrupts = irq["interrupts"].as_u64().unwrap();
    let without = irq["without_interrupt"].as_u64().unwrap();
    assert!(interrupts > 0, "no interrupt taken: {irq}");
    // Every measured request was either announced by an interrupt (and has a handler time)
    // or found when re-arming; the handler never runs after ring 3 saw the completion.
    let handled = irq["handler_ns"]["count"].as_u64().unwrap();
    assert_eq!(handled + without, ios, "{irq}");
    assert!(handled > 0, "{irq}");
    assert!(irq["wake_ns"]["count"].as_u64().unwrap() > 0, "{irq}");
    assert!(
        irq["handler_ns"]["p50"].as_u64().unwrap() <= r["lat_ns"]["p50"].as_u64().unwrap(),
        "the handler ran after ring 3 saw the completion: {r}"
    );
    // Every queue interrupted, and the guest took no more than the host sent (one may
    // still be in flight when the guest stops).
    assert_eq!(host_sent.len(), queues, "{host_sent:?}");
    assert!(host_sent.iter().all(|&n| n > 0), "{host_sent:?}");
    let sent: u64 = host_sent.iter().sum();
    assert!(
        sent >= interrupts,
        "host sent {sent}, guest took {interrupts}"
    );
}

fn write_then_verify_with_interrupts(queues: u32) {
    let d = disk(64 << 20);
    let spec = format!("path={},queues={queues}", d.path().display());
    let ios = 2000;
    let common =
        format!("bs=4k qd=8 queues={queues} ios={ios} size=16m verify=1 irq=1 seed={queues}");
    let (w, sent) = blkbench(&spec, &format!("rw=randwrite {common}"));
    assert_eq!(w["verify"], "ok", "{w}");
    assert_eq!(w["writes"], ios);
    check_irq(&w, ios, &sent, queues as usize);
    let (r, sent) = blkbench(&spec, &format!("rw=randread {common}"));
    assert_eq!(r["verify"], "ok", "{r}");
    assert!(r["verify_sectors"].as_u64().unwrap() > 0, "{r}");
    check_irq(&r, ios, &sent, queues as usize);
}

#[test]
fn test_blkbench_irq_write_read_verify_one_queue_passes() {
    if have_kvm() {
        write_then_verify_with_interrupts(1);
    }
}

#[test]
fn test_blkbench_irq_write_read_verify_two_queues_passes() {
    if have_kvm() {
        write_then_verify_with_interrupts(2);
    }
}

#[test]
fn test_blkbench_irq_with_chaos_is_a_bad_parameter() {
    if !have_kvm() {
        return;
    }
    let d = disk(16 << 20);
    let r = run(&[
        "run",
        "--kernel",
        &guest("blkbench").to_string_lossy(),
        "--disk",
        &format!("path={}", d.path().display()),
        "--cmdline",
        "chaos=1 irq=1",
    ]);
    // EXIT_BAD_PARAM (5) through isa-debug-exit: (5 << 1) | 1.
    assert_eq!(r.status, 11, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("bad parameter: irq=1"), "{}", r.stdout);
}

#[test]
fn test_bench_irq_both_runs_each_job_polled_and_with_interrupts() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let r = run(&[
        "bench",
        "--rw",
        "randread",
        "--qd",
        "1",
        "--runtime",
        "0.5",
        "--disk-size",
        "64M",
        "--irq",
        "both",
        "--json",
        &json.to_string_lossy(),
    ]);
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines[0].contains("hnd p50") && lines[0].contains("wake p50"),
        "{}",
        r.stdout
    );
    assert!(
        lines[2].starts_with("4k randread qd1 ") && lines[2].ends_with("-"),
        "{}",
        r.stdout
    );
    assert!(lines[3].starts_with("4k randread qd1 irq"), "{}", r.stdout);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let jobs = doc["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["job"]["irq"], false);
    assert!(
        jobs[0]["guest"].get("irq").is_none(),
        "{}",
        jobs[0]["guest"]
    );
    assert_eq!(jobs[1]["job"]["irq"], true);
    // At QD1 every request is announced by exactly one interrupt (EVENT_IDX: the device
    // interrupts once per armed completion), give or take the window's two edges.
    let g = &jobs[1]["guest"];
    let (interrupts, ios) = (
        g["irq"]["interrupts"].as_i64().unwrap(),
        g["ios"].as_i64().unwrap(),
    );
    assert!(
        ios > 0 && (interrupts - ios).abs() <= 2,
        "{} interrupts for {ios} requests",
        interrupts
    );
    assert!(g["irq"]["handler_ns"]["p50"].as_u64().unwrap() > 0);
}
