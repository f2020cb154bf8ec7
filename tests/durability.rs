//! Crash durability: blkbench randwrite with `flush_every=` and `durable=1` runs under
//! ringvm, which is killed with SIGKILL at a random moment; a second boot with
//! `verify_only=1` reads the whole disk and checks that every write that completed before
//! the last completed FLUSH the guest reported is there (guests/src/bench/durable.rs
//! explains the bookkeeping). SIGKILL ends the VMM, not the host kernel: what this proves
//! is that ringvm never completes a write or a flush to the guest before the host kernel
//! has the data, not what a power cut would leave on the medium.
//!
//! The normal suite runs 5 kills; `RINGVM_DURABILITY_KILLS=100` runs 100 (about 5 minutes).
//! `RINGVM_DURABILITY_SEED=n` repeats a run's kill times.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{guest, have_kvm, ringvm, run};

const DISK_BYTES: u64 = 16 << 20;
const WRITER: &str =
    "rw=randwrite bs=4k qd=16 size=16m verify=1 flush_every=32 durable=1 runtime=120";
/// Kill no earlier than this after the writer's first line, and no later than this + SPAN.
const KILL_MIN_MS: u64 = 20;
const KILL_SPAN_MS: u64 = 1500;

/// Kills and reaps the writer however the test ends.
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the killed writer promised: its run id and the newest flushed generation.
struct Promise {
    run: u64,
    upto: u64,
    flushes: u64,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn disk_spec(path: &std::path::Path) -> String {
    format!("path={}", path.display())
}

/// Boots the writer, kills it `delay` after its `durable: run` line, returns the promise.
/// Boots again while the image is still locked by the previous VMM (see `check`).
fn write_and_kill(spec: &str, seed: u64, delay: Duration) -> Promise {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_write_and_kill(spec, seed, delay) {
            Ok(p) => return p,
            Err(stderr)
                if stderr.contains("in use by another process") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(stderr) => panic!("the writer ended before its `durable: run` line: {stderr}"),
        }
    }
}

fn try_write_and_kill(spec: &str, seed: u64, delay: Duration) -> Result<Promise, String> {
    let kernel = guest("blkbench");
    let cmdline = format!("{WRITER} seed={seed}");
    let child = ringvm()
        .args([
            "run",
            "--kernel",
            &kernel.to_string_lossy(),
            "--memory",
            "256M",
        ])
        .args(["--disk", spec, "--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvm");
    let mut w = Writer(child);
    let stdout = w.0.stdout.take().unwrap();
    // Drained all along, so a chatty VMM never blocks on a full pipe.
    let mut stderr = w.0.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        err
    });
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut p = Promise {
        run: 0,
        upto: 0,
        flushes: 0,
    };
    let mut seen = Vec::new();
    let mut take = |line: String, p: &mut Promise| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["durable:", "run", run, ..] => {
                p.run = u64::from_str_radix(run.trim_start_matches("0x"), 16).unwrap()
            }
            ["durable:", "flushed", _, "gen", g] => {
                p.flushes += 1;
                p.upto = p.upto.max(g.parse().unwrap());
            }
            _ => seen.push(line),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.run == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => take(line, &mut p),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = w.0.wait();
                let err = errors.join().unwrap_or_default();
                return Err(format!("{err}\nconsole: {seen:?}"));
            }
            Err(_) => panic!("the writer printed no `durable: run` line in 60 s: {seen:?}"),
        }
    }
    std::thread::sleep(delay);
    w.0.kill().expect("SIGKILL ringvm");
    w.0.wait().unwrap();
    reader.join().unwrap();
    let _ = errors.join();
    for line in rx.try_iter() {
        take(line, &mut p);
    }
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("device error") || l.contains("verify mismatch")),
        "the writer reported errors: {seen:?}"
    );
    Ok(p)
}

/// Boots the checker; returns its JSON line.
fn check(spec: &str, seed: u64, p: &Promise) -> serde_json::Value {
    let kernel = guest("blkbench");
    let cmdline = format!(
        "verify_only=1 bs=4k size=16m seed={seed} run={:#x} upto={}",
        p.run, p.upto
    );
    // The killed VMM's io_uring (which holds the image, and with it the image lock) is torn
    // down by the kernel after the process is gone, once its in-flight requests are done:
    // until then the image is rightly "in use". Wait for that.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = run(&[
            "run",
            "--kernel",
            &kernel.to_string_lossy(),
            "--memory",
            "256M",
            "--disk",
            spec,
            "--cmdline",
            &cmdline,
        ]);
        if !r.stderr.contains("in use by another process") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("{\"blkbench_verify\":"))
        .unwrap_or_else(|| panic!("no verify line; stdout: {} stderr: {}", r.stdout, r.stderr));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let code = (r.status - 1) / 2;
    assert!(
        code == 0 || code == 4,
        "checker exit code {code}: {}",
        r.stdout
    );
    v
}

fn kills(n: u64) {
    let d = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    d.as_file().set_len(DISK_BYTES).unwrap();
    let spec = disk_spec(d.path());
    let mut rng = std::env::var("RINGVM_DURABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("durability: {n} kills, RINGVM_DURABILITY_SEED={rng}");
    let (mut promised, mut checked, mut flushes) = (0, 0, 0);
    let mut last = None;
    for k in 0..n {
        let seed = k + 1;
        let delay = Duration::from_millis(KILL_MIN_MS + xorshift(&mut rng) % KILL_SPAN_MS);
        let p = write_and_kill(&spec, seed, delay);
        let v = check(&spec, seed, &p);
        assert_eq!(v["lost"], 0, "kill {k} after {delay:?}: lost writes: {v}");
        assert_eq!(
            v["corrupt"], 0,
            "kill {k} after {delay:?}: corrupt sectors: {v}"
        );
        assert_eq!(
            v["misplaced"], 0,
            "kill {k} after {delay:?}: misplaced stamps: {v}"
        );
        assert!(
            v["newest_gen"].as_u64().unwrap() >= p.upto,
            "the newest generation on disk is older than the last flushed one: {v}"
        );
        promised += p.upto;
        checked += v["checked_writes"].as_u64().unwrap();
        flushes += p.flushes;
        last = Some((seed, p));
    }
    eprintln!(
        "durability: {n} kills, {flushes} flushes reported, {promised} writes promised by a completed flush, \
         {checked} block contents checked (the newest promised write of each block), lost 0"
    );
    assert!(
        promised > 0,
        "no kill landed after a completed flush; nothing was checked"
    );
    // The check can fail: a disk that lost everything is caught.
    let (seed, p) = last.unwrap();
    if p.upto > 0 {
        d.as_file().set_len(0).unwrap();
        d.as_file().set_len(DISK_BYTES).unwrap();
        let v = check(&spec, seed, &p);
        assert!(
            v["lost"].as_u64().unwrap() > 0,
            "a zeroed disk must show lost writes: {v}"
        );
    }
}

#[test]
fn test_durability_sigkill_during_randwrite_loses_no_flushed_write() {
    if !have_kvm() {
        return;
    }
    let n = std::env::var("RINGVM_DURABILITY_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    kills(n);
}
