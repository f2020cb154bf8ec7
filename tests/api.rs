//! The control plane end to end: blkbench runs while a client scrapes `/metrics`, changes
//! the poll window, closes intervals, sends every kind of bad request, and stops the VM.
//!
//! The exposition is also checked with the reference parser, Python's `prometheus_client`
//! (scripts/test.sh installs it); the test fails, naming the install command, when it is
//! missing.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{guest, have_kvm, ringvm};

/// The VMs of these tests pin the same cores: one at a time.
static VM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Vm {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
    _disk: tempfile::NamedTempFile,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots blkbench (4k randread QD1 for `runtime` s) with an API socket and waits for it.
fn boot(poll_us: u32, runtime: u32, extra: &[&str]) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let disk = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    disk.as_file().set_len(64 << 20).unwrap();
    let sock = dir.path().join("api.sock");
    let child = ringvm()
        .args([
            "run",
            "--kernel",
            guest("blkbench").to_str().unwrap(),
            "--memory",
            "256M",
            "--disk",
            &format!("path={},poll-us={poll_us}", disk.path().display()),
            "--cmdline",
            &format!("rw=randread bs=4k qd=1 queues=1 runtime={runtime} ramp=0"),
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let vm = Vm {
        child,
        sock,
        _dir: dir,
        _disk: disk,
    };
    let t = Instant::now();
    while !vm.sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm
}

/// The `Cpus_allowed_list` of process `pid`'s thread named `api`.
fn api_thread_cores(pid: u64) -> String {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "api") {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap();
            let line = status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .unwrap();
            return line.split(':').nth(1).unwrap().trim().to_string();
        }
    }
    panic!("ringvm ({pid}) has no thread named api");
}

/// Sends raw bytes, returns (status, body).
fn raw(sock: &Path, req: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw(sock, req.as_bytes())
}

/// A counter of blk0's queue 0 in an exposition; `None` before the guest set the queue up.
fn try_counter(text: &str, name: &str) -> Option<u64> {
    let series = format!("ringvm_queue_{name}_total{{device=\"blk0\",queue=\"0\",reactor=\"0\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.parse().unwrap())
}

fn counter(text: &str, name: &str) -> u64 {
    try_counter(text, name).unwrap_or_else(|| panic!("no {name} of blk0 q0 in\n{text}"))
}

fn scrape(sock: &Path) -> String {
    let (s, body) = call(sock, "GET", "/metrics", "");
    assert_eq!(s, 200, "{body}");
    body
}

/// Waits for the guest's first requests.
fn wait_for_io(sock: &Path) {
    let t = Instant::now();
    while try_counter(&scrape(sock), "requests").unwrap_or(0) == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "no I/O");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops through the API and returns the exit status and stderr.
fn stop(mut vm: Vm) -> (i32, String) {
    let (s, body) = call(&vm.sock, "PUT", "/vm/stop", "");
    assert_eq!(s, 202, "{body}");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = vm.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "VM did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    vm.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!vm.sock.exists(), "socket left behind");
    (status.code().unwrap_or(-1), err)
}

/// Parses `text` with prometheus_client and prints `family type samples` lines.
fn python_parse(text: &str) -> String {
    let script = r#"
import sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("MISSING")
    sys.exit(3)
for f in text_string_to_metric_families(sys.stdin.read()):
    print(f.name, f.type, len(f.samples))
"#;
    let mut p = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to check the exposition");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !stdout.contains("MISSING"),
        "Python's prometheus_client is missing: install it with \
         `python3 -m pip install prometheus_client` (scripts/test.sh does)"
    );
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn test_api_metrics_rise_parse_and_stop_removes_socket() {
    if !have_kvm() {
        return;
    }
    let _g = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let hlog = tempfile::NamedTempFile::new().unwrap();
    let vm = boot(32, 30, &["--hlog", hlog.path().to_str().unwrap()]);
    let mode = std::fs::metadata(&vm.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    wait_for_io(&vm.sock);

    let first = scrape(&vm.sock);
    std::thread::sleep(Duration::from_millis(500));
    let second = scrape(&vm.sock);
    for name in ["requests", "reads", "read_bytes"] {
        assert!(
            counter(&second, name) > counter(&first, name),
            "{name} did not rise"
        );
    }
    let families = python_parse(&second);
    for want in [
        "ringvm_queue_requests counter 1",
        "ringvm_queue_poll_hits counter 1",
        "ringvm_queue_kick_to_complete_seconds histogram 22",
        "ringvm_queue_service_seconds histogram 22",
        "ringvm_reactor_busy_seconds counter 1",
    ] {
        assert!(
            families.lines().any(|l| l == want),
            "{want} not in\n{families}"
        );
    }

    let (s, vmj) = call(&vm.sock, "GET", "/vm", "");
    let v: serde_json::Value = serde_json::from_str(&vmj).unwrap();
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{vmj}");
    assert_eq!(v["disks"][0]["id"], "blk0");
    assert!(
        v["io_cores"].is_array() && v["vcpu_cores"].is_array(),
        "{v}"
    );
    // The API thread: on a core with no vCPU or reactor, else on the first reactor's (never
    // a vCPU's when a reactor has a core of its own), and pinned there.
    let cores = |k: &str| -> Vec<usize> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() as usize)
            .collect()
    };
    let (vcpus, ios) = (cores("vcpu_cores"), cores("io_cores"));
    let want = ringvm::config::host_cores()
        .into_iter()
        .find(|c| !vcpus.contains(c) && !ios.contains(c))
        .or(ios.first().copied());
    assert_eq!(v["api_core"].as_u64().map(|c| c as usize), want, "{v}");
    assert_eq!(
        api_thread_cores(v["pid"].as_u64().unwrap()),
        format!("{}", want.unwrap())
    );

    let (s, stats) = call(&vm.sock, "GET", "/stats", "");
    let st: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(s, 200);
    assert!(st["queues"][0]["requests"].as_u64().unwrap() > 0, "{st}");

    for n in 1..=2 {
        let (s, body) = call(&vm.sock, "PUT", "/stats/interval", "");
        let iv: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((s, iv["interval"].as_u64()), (200, Some(n)), "{body}");
        assert!(iv["requests"].as_u64().unwrap() > 0, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The steady scraper: 20 answers on one connection, each a whole exposition whose
    // buckets only grow, end at `_count`, and whose exact `_sum` gives a mean inside the
    // histogram's range.
    let watch = ringvm()
        .args(["ctl", "--api-socket", vm.sock.to_str().unwrap()])
        .args(["metrics", "--every-ms", "5", "--count", "20"])
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&watch.stdout),
        String::from_utf8_lossy(&watch.stderr),
    );
    assert!(watch.status.success(), "{err}");
    assert!(err.contains("20 scrapes of /metrics"), "{err}");
    assert_eq!(
        out.matches("# TYPE ringvm_uptime_seconds gauge").count(),
        20
    );
    let last = &out[out.rfind("# HELP ringvm_uptime_seconds").unwrap()..];
    let family = "ringvm_queue_kick_to_complete_seconds";
    let buckets: Vec<f64> = last
        .lines()
        .filter(|l| l.starts_with(&format!("{family}_bucket{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 20, "{last}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let value = |suffix: &str| -> f64 {
        last.lines()
            .find_map(|l| l.strip_prefix(&format!("{family}_{suffix}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {family}_{suffix} in\n{last}"))
            .parse()
            .unwrap()
    };
    let (count, sum) = (value("count"), value("sum"));
    assert_eq!(buckets[19], count);
    let h = &st["queues"][0]["kick_to_complete_ns"];
    let mean_ns = sum * 1e9 / count;
    assert!(
        h["min"].as_f64().unwrap() * 0.99 <= mean_ns && mean_ns <= 1e10,
        "mean {mean_ns} ns from the exposition vs {h}"
    );

    let ctl = ringvm()
        .args(["ctl", "--api-socket", vm.sock.to_str().unwrap(), "stats"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&ctl.stdout);
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    assert!(
        table.contains("p99.9 µs") && table.contains("blk0"),
        "{table}"
    );

    let (status, stderr) = stop(vm);
    assert_eq!(status, 143, "the same status as SIGTERM: {stderr}");
    assert!(
        stderr.contains("stopped through the API socket"),
        "{stderr}"
    );
    // Two intervals from the API and the last one at stop, each with k2c, svc and batch.
    let log = std::fs::read_to_string(hlog.path()).unwrap();
    let k2c = log
        .lines()
        .filter(|l| l.starts_with("Tag=blk0-q0-k2c,"))
        .count();
    assert_eq!(k2c, 3, "{log}");
}

#[test]
fn test_api_patch_poll_us_zero_stops_poll_hits_and_back_resumes() {
    if !have_kvm() {
        return;
    }
    let _g = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let vm = boot(64, 30, &[]);
    wait_for_io(&vm.sock);
    let t = Instant::now();
    while counter(&scrape(&vm.sock), "poll_hits") == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "polling never hit");
        std::thread::sleep(Duration::from_millis(50));
    }

    let (s, body) = call(&vm.sock, "PATCH", "/disks/blk0", "{\"poll_us\": 0}");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("\"queues_changed\":1"), "{body}");
    std::thread::sleep(Duration::from_millis(300));
    let a = scrape(&vm.sock);
    std::thread::sleep(Duration::from_millis(1000));
    let b = scrape(&vm.sock);
    assert_eq!(
        counter(&b, "poll_hits"),
        counter(&a, "poll_hits"),
        "polling off: no hits"
    );
    assert!(
        counter(&b, "requests") > counter(&a, "requests"),
        "the guest still runs"
    );
    assert!(
        counter(&b, "kicks") > counter(&a, "kicks"),
        "requests come by kick"
    );
    let (_, v) = call(&vm.sock, "GET", "/vm", "");
    assert!(v.contains("\"poll_us\":0"), "{v}");

    let (s, _) = call(&vm.sock, "PATCH", "/disks/blk0", "{\"poll_us\": 64}");
    assert_eq!(s, 200);
    let t = Instant::now();
    while counter(&scrape(&vm.sock), "poll_hits") == counter(&b, "poll_hits") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "polling did not come back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(vm);
}

#[test]
fn test_api_bad_requests_get_4xx_json_and_a_slow_client_blocks_no_one() {
    if !have_kvm() {
        return;
    }
    let _g = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let vm = boot(32, 30, &[]);
    let sock = vm.sock.clone();
    // A client that sends half a request and then nothing.
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"GET /vm HTTP/1.1\r\nHost:").unwrap();

    let big_header = format!("GET /vm HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    let big_body = format!(
        "PATCH /disks/blk0 HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{}",
        " ".repeat(5000)
    );
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            404,
            "No endpoint /nope",
        ),
        (
            b"POST /metrics HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            405,
            "use GET",
        ),
        (
            b"GET /vm/stop HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            405,
            "use PUT",
        ),
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "Malformed request line"),
        (big_header.into_bytes(), 431, "exceed"),
        (big_body.into_bytes(), 413, "exceeds the limit"),
        (
            b"PATCH /disks/blk0 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            501,
            "Content-Length",
        ),
    ];
    for (req, status, says) in cases {
        let (s, body) = raw(&sock, &req);
        assert_eq!(s, status, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains(says), "{body}");
    }
    for (path, body, status, says) in [
        ("/disks/blk0", "{\"poll_us\": ", 400, "Malformed JSON"),
        (
            "/disks/blk0",
            "{\"poll_us\": -3}",
            400,
            "integer from 0 to 1000000",
        ),
        (
            "/disks/blk0",
            "{\"poll_us\": 2000000}",
            400,
            "integer from 0 to 1000000",
        ),
        ("/disks/blk0", "{\"poll\": 1}", 400, "Unknown field"),
        (
            "/disks/blk9",
            "{\"poll_us\": 1}",
            404,
            "No disk with id `blk9`",
        ),
        (
            "/nets/net0",
            "{\"poll_us\": 1}",
            404,
            "No net with id `net0`",
        ),
    ] {
        let (s, b) = call(&sock, "PATCH", path, body);
        assert_eq!(s, status, "{path} {body}: {b}");
        assert!(b.contains(says), "{b}");
    }

    // The slow client still holds its connection; others are served at once.
    let t = Instant::now();
    let (s, _) = call(&sock, "GET", "/vm", "");
    assert_eq!(s, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // ...and after the request timeout it gets a 408 and is closed.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");

    // None of it stopped the guest.
    let (s, v) = call(&sock, "GET", "/vm", "");
    assert!(s == 200 && v.contains("\"state\":\"running\""), "{v}");
    let (status, _) = stop(vm);
    assert_eq!(status, 143);
}

/// `ringvm run` of the hello guest with `--api-socket sock` and `extra`.
fn run_hello_with_api(sock: &Path, extra: &[&str]) -> common::Run {
    let kernel = guest("hello");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    common::run(&args)
}

#[test]
fn test_api_core_not_on_this_host_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let r = run_hello_with_api(&sock, &["--api-core", "4095"]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert!(r.stderr.contains("--api-core 4095"), "{}", r.stderr);
    assert!(!sock.exists(), "no socket is left behind");
}

#[test]
fn test_api_socket_served_by_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let _held = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let r = run_hello_with_api(&sock, &[]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("in use by another process"),
        "{}",
        r.stderr
    );
    assert!(sock.exists(), "the other process's socket is left alone");
}

#[test]
fn test_api_stale_socket_is_replaced_and_removed_at_exit() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let r = run_hello_with_api(&sock, &["--serial", "none"]);
    assert!(!r.stderr.contains("error"), "{}", r.stderr);
    assert!(!sock.exists(), "socket left behind");
}
