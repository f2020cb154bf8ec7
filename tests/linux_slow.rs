//! Boots Debian's cloud kernel with the guests/linux initramfs on a virtio-blk disk and
//! checks what the guest's /init reports. Opt-in (`RINGVM_SLOW_TESTS=1`): on this lab's
//! nested KVM a boot takes many minutes (perf/RESULTS.md, "Linux guests"); on a real KVM
//! host about two seconds. Builds the image with guests/linux/build.sh (root, apt) when
//! guests/linux/out/ lacks it.
//!
//! `RINGVM_LINUX_TIMEOUT_S` (default 3600) bounds each boot; `RINGVM_LINUX_INITRD` picks
//! another initramfs (e.g. guests/linux/out/initramfs-base.cpio, without fio: the dd
//! test then boots faster where the kernel is emulated); `RINGVM_LINUX_CMDLINE_EXTRA` is
//! appended to the kernel command line (on this lab's host: the `clearcpuid=…` list in
//! perf/RESULTS.md, "Linux guests").

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::have_kvm;

const DISK_BYTES: u64 = 64 << 20;
const DEFAULT_TIMEOUT_S: u64 = 3600;

/// One Linux boot at a time: each keeps a host core busy for minutes.
static BOOT: Mutex<()> = Mutex::new(());

fn enabled() -> bool {
    if std::env::var("RINGVM_SLOW_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "SKIP: Linux guest boot; set RINGVM_SLOW_TESTS=1 to run it (minutes on a nested KVM)"
        );
        return false;
    }
    have_kvm()
}

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/linux/out")
}

/// The kernel and initramfs, built by guests/linux/build.sh when missing.
fn image() -> (PathBuf, PathBuf) {
    let out = out_dir();
    let kernel = out.join("vmlinux");
    let initrd = match std::env::var_os("RINGVM_LINUX_INITRD") {
        Some(p) => PathBuf::from(p),
        None => out.join("initramfs.cpio"),
    };
    if !kernel.exists() || !initrd.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/linux/build.sh");
        eprintln!("building the Linux guest: {}", script.display());
        let st = Command::new(&script)
            .status()
            .expect("run guests/linux/build.sh");
        assert!(
            st.success(),
            "guests/linux/build.sh failed ({st}); it needs root and apt"
        );
    }
    assert!(
        kernel.exists(),
        "{} missing after build.sh",
        kernel.display()
    );
    assert!(
        initrd.exists(),
        "{} missing after build.sh",
        initrd.display()
    );
    (kernel, initrd)
}

struct Boot {
    status: Option<i32>,
    console: String,
    stderr: String,
    /// ringvm's --stats-json: per-queue host counters and histograms
    stats: Option<serde_json::Value>,
    elapsed: Duration,
}

/// Boots the Linux guest on a fresh zeroed disk of DISK_BYTES with `cmdline`.
fn boot(cmdline: &str) -> Boot {
    let _one = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let (kernel, initrd) = image();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
    let console = dir.path().join("console.log");
    let stderr = dir.path().join("stderr.log");
    let stats = dir.path().join("stats.json");
    let timeout = Duration::from_secs(
        std::env::var("RINGVM_LINUX_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_TIMEOUT_S),
    );
    eprintln!(
        "booting Linux (console in {}, timeout {:?})",
        console.display(),
        timeout
    );
    let disk_arg = format!("path={}", disk.display());
    let cmdline = match std::env::var("RINGVM_LINUX_CMDLINE_EXTRA") {
        Ok(extra) if !extra.trim().is_empty() => format!("{cmdline} {}", extra.trim()),
        _ => cmdline.to_string(),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringvm"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--disk",
            &disk_arg,
            "--memory",
            "512M",
            "--cmdline",
            &cmdline,
            "--stats-json",
        ])
        .arg(&stats)
        .stdin(Stdio::null())
        .stdout(File::create(&console).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn ringvm");
    let start = Instant::now();
    let mut polls = 0u32;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        // A panicked kernel never ends the VM: stop waiting once its last line is out.
        polls += 1;
        let panicked = polls % 10 == 0
            && std::fs::read(&console)
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains("---[ end Kernel panic"));
        if panicked || start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    Boot {
        status,
        console: String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&std::fs::read(&stderr).unwrap()).into_owned(),
        stats: std::fs::read(&stats)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
        elapsed: start.elapsed(),
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Boot {
    fn check(&self, what: &str, ok: bool) {
        assert!(
            ok,
            "{what} (status {:?} after {:?})\n--- console (last 60 lines) ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.elapsed,
            tail(&self.console, 60),
            self.stderr
        );
    }

    /// A counter summed over every queue of the host's statistics.
    fn host_sum(&self, counter: &str) -> u64 {
        self.check("no --stats-json from ringvm", self.stats.is_some());
        let queues = self.stats.as_ref().unwrap()["queues"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        queues
            .iter()
            .map(|q| q[counter].as_u64().unwrap_or(0))
            .sum()
    }
}

#[test]
fn test_linux_dd_on_virtio_blk_reads_back_what_it_wrote() {
    if !enabled() {
        return;
    }
    let b = boot("console=ttyS0 reboot=k ringvm.test=dd");
    eprintln!("Linux dd test: {:?}, status {:?}", b.elapsed, b.status);
    b.check(
        "the guest did not see the 64 MiB disk",
        b.console.contains("RINGVM-VDA-SECTORS=131072"),
    );
    b.check(
        "dd read back something else",
        !b.console.contains("RINGVM-DD-FAIL"),
    );
    b.check("no RINGVM-DD-OK", b.console.contains("RINGVM-DD-OK"));
    b.check(
        "the guest did not end with an i8042 reset",
        b.status == Some(0),
    );
    assert!(
        !b.stderr.contains("panicked"),
        "ringvm panicked: {}",
        b.stderr
    );
    // two 1 MiB O_DIRECT writes, each followed by fsync (a virtio-blk flush)
    assert!(
        b.host_sum("bytes_written") >= 2 << 20,
        "host stats: {:?}",
        b.stats
    );
    assert!(b.host_sum("flushes") >= 2, "host stats: {:?}", b.stats);
    assert_eq!(b.host_sum("errors"), 0, "host stats: {:?}", b.stats);
}

/// `poweroff -f` in a Linux guest ends the VM through ACPI S5 (the FADT's sleep control
/// register and the DSDT's `\_S5`): status 0, "guest powered off".
#[test]
fn test_linux_poweroff_ends_vm_through_acpi_s5() {
    if !enabled() {
        return;
    }
    let b = boot("console=ttyS0 ringvm.test=dd ringvm.poweroff");
    eprintln!(
        "Linux poweroff test: {:?}, status {:?}",
        b.elapsed, b.status
    );
    b.check("no RINGVM-DD-OK", b.console.contains("RINGVM-DD-OK"));
    b.check(
        "the kernel did not power down",
        b.console.contains("reboot: Power down"),
    );
    b.check(
        "ringvm did not stop on the ACPI power-off",
        b.stderr.contains("guest powered off (ACPI S5)") && b.status == Some(0),
    );
}

#[test]
fn test_linux_fio_json_agrees_with_host_stats() {
    if !enabled() {
        return;
    }
    let b = boot(
        // 30 s: on the nested PVM host each request takes about a second of emulated
        // kernel work, and a 2-s job there completed nothing (perf/RESULTS.md, run G)
        "console=ttyS0 reboot=k fio=--rw=randread --bs=4k --iodepth=8 --runtime=30 --time_based",
    );
    eprintln!("Linux fio test: {:?}, status {:?}", b.elapsed, b.status);
    let json = b
        .console
        .split_once("===FIO-JSON-BEGIN===")
        .and_then(|(_, rest)| rest.split_once("===FIO-JSON-END==="))
        .map(|(json, _)| json.trim().to_string());
    b.check("no fio JSON between the markers", json.is_some());
    let v: serde_json::Value = serde_json::from_str(&json.unwrap()).expect("fio's JSON parses");
    let read = &v["jobs"][0]["read"];
    let guest_bytes = read["io_bytes"].as_u64().unwrap_or(0);
    assert!(guest_bytes > 0, "fio read nothing: {read}");
    assert_eq!(
        v["jobs"][0]["error"].as_u64(),
        Some(0),
        "fio job error: {}",
        v["jobs"][0]
    );
    b.check(
        "the guest did not end with an i8042 reset",
        b.status == Some(0),
    );
    // the host served at least what fio counted (plus the partition scan)
    assert!(
        b.host_sum("bytes_read") >= guest_bytes,
        "host stats: {:?}",
        b.stats
    );
}
