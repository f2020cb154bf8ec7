//! Image locking as QEMU does it: a second writer of a disk image, ringvm or QEMU, is refused
//! at start-up with a one-line error naming the image; readers share; `lock=off` opts out.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, have_kvm, run};

/// The tests start long-running VMs that hold images; one at a time keeps this 2-core lab
/// machine's timing sane.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The last byte ringvm locks ("resize" not shared), and QEMU's ("write" not shared).
const RINGVM_LAST_BYTE: i64 = 203;
const QEMU_LAST_BYTE: i64 = 201;

/// How long a holder may take to start and lock its image.
const HOLD_TIMEOUT_MS: u64 = 30_000;

fn blkbench() -> String {
    guest("blkbench").to_string_lossy().into_owned()
}

/// A disk image on a file system with O_DIRECT and OFD locks (the target dir, not tmpfs).
fn image() -> tempfile::NamedTempFile {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(64 << 20).unwrap();
    f
}

/// A child process that is killed and reaped however the test ends.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether anyone holds a lock on `byte` of `path` (QEMU's lock bytes: 100 + permission,
/// 200 + unshared permission; 101 is "write").
fn byte_locked(path: &Path, byte: i64) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock is plain data; the fields the kernel reads are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: F_OFD_GETLK on an fd we own, with a valid flock to fill in.
    let r = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::F_OFD_GETLK,
            &mut fl,
        )
    };
    r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Starts `cmd` and waits until it holds a lock on `byte` of `path`: the last byte it
/// locks, so that all its locks are in place (ringvm locks 100, [101,] 201, 203 in that
/// order; QEMU 100, [101,] 201).
fn hold(mut cmd: Command, path: &Path, byte: i64) -> Holder {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    let mut h = Holder(child);
    let start = Instant::now();
    while !byte_locked(path, byte) {
        if let Ok(Some(status)) = h.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = h.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!(
                "holder exited ({status}) before locking {}: {err}",
                path.display()
            );
        }
        assert!(
            start.elapsed() < Duration::from_millis(HOLD_TIMEOUT_MS),
            "holder did not lock byte {byte} of {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    h
}

/// Waits until nobody holds `byte` of `path`: a killed holder's locks go when the kernel has
/// torn down its io_uring, a moment after the process (README, image locking), and a new
/// holder must not be mistaken for the old one.
fn wait_unlocked(path: &Path, byte: i64) {
    let start = Instant::now();
    while byte_locked(path, byte) {
        assert!(
            start.elapsed() < Duration::from_millis(HOLD_TIMEOUT_MS),
            "byte {byte} of {} stayed locked after its holder was killed",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A ringvm whose blkbench guest keeps reading `disk_spec` for a long time.
fn ringvm_holding(disk_spec: &str) -> Command {
    let mut c = common::ringvm();
    c.args([
        "run",
        "--kernel",
        &blkbench(),
        "--memory",
        "64M",
        "--disk",
        disk_spec,
        "--cmdline",
        "rw=randread bs=4k qd=1 runtime=60",
    ]);
    c
}

/// A short ringvm run on `disks`: (status, stderr, seconds it took).
fn ringvm_short(disks: &[&str]) -> (i32, String, f64) {
    let kernel = blkbench();
    let mut args = vec!["run", "--kernel", &kernel, "--memory", "64M"];
    for d in disks {
        args.extend(["--disk", d]);
    }
    args.extend(["--cmdline", "rw=randread bs=4k qd=1 ios=200"]);
    let start = Instant::now();
    let r = run(&args);
    (r.status, r.stderr, start.elapsed().as_secs_f64())
}

fn qemu_available(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: this test needs {tool} (perf/qemu-blkbench.sh installs QEMU 10)");
    }
    ok
}

/// QEMU 10 with the image on a virtio-blk device, paused before the guest runs (`-S`):
/// QEMU takes its image locks when the device is realized.
fn qemu_holding(path: &Path, readonly: bool) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let ro = if readonly { ",readonly=on" } else { "" };
    c.args([
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "q35",
        "-accel",
        "tcg",
    ])
    .args(["-m", "64", "-monitor", "none", "-serial", "none"])
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=none,id=d0,cache=none{ro}",
        path.display()
    ))
    .args(["-device", "virtio-blk-pci,drive=d0"]);
    c
}

/// `qemu-io` on the image: (success, stderr).
fn qemu_io(path: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(args)
        .arg(path)
        .output()
        .expect("spawn qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("can't open"), text)
}

/// Starts QEMU on the image and expects it to give up at start-up: its stderr.
fn qemu_refused(path: &Path, readonly: bool) -> String {
    let child = qemu_holding(path, readonly)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let mut q = Holder(child);
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = q.0.try_wait() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_millis(HOLD_TIMEOUT_MS),
            "QEMU (readonly={readonly}) started on an image ringvm holds"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = q.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(!status.success(), "{err}");
    err
}

fn assert_refused_naming(status: i32, stderr: &str, path: &Path, secs: f64) {
    let p = path.display().to_string();
    assert_eq!(status, 1, "refused at start-up; stderr: {stderr}");
    assert!(stderr.contains(&p), "names the image: {stderr}");
    assert!(stderr.contains("in use"), "says why: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(secs < 10.0, "fails fast, took {secs:.1} s");
}

#[test]
fn test_second_ringvm_on_held_image_refused_fast_naming_it() {
    if !have_kvm() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    let spec = format!("path={}", img.path().display());
    let _first = hold(ringvm_holding(&spec), img.path(), RINGVM_LAST_BYTE);
    let (status, stderr, secs) = ringvm_short(&[&spec]);
    assert_refused_naming(status, &stderr, img.path(), secs);
    assert!(stderr.contains("ringvm (pid"), "names the holder: {stderr}");
    // A reader is refused too while a writer holds the image.
    let ro = format!("{spec},readonly");
    let (status, stderr, secs) = ringvm_short(&[&ro]);
    assert_refused_naming(status, &stderr, img.path(), secs);
    // lock=off opts out.
    let off = format!("{spec},lock=off");
    let (status, stderr, _) = ringvm_short(&[&off]);
    assert_eq!(status, 1, "blkbench passes with lock=off; stderr: {stderr}");
}

#[test]
fn test_readonly_ringvms_share_image() {
    if !have_kvm() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    let ro = format!("path={},readonly", img.path().display());
    let _first = hold(ringvm_holding(&ro), img.path(), RINGVM_LAST_BYTE);
    let (status, stderr, _) = ringvm_short(&[&ro]);
    assert_eq!(status, 1, "a second reader runs; stderr: {stderr}");
    let rw = format!("path={}", img.path().display());
    let (status, stderr, secs) = ringvm_short(&[&rw]);
    assert_refused_naming(status, &stderr, img.path(), secs);
}

#[test]
fn test_same_image_twice_in_one_run_refused() {
    if !have_kvm() {
        return;
    }
    let img = image();
    let spec = format!("path={}", img.path().display());
    let (status, stderr, secs) = ringvm_short(&[&spec, &spec]);
    assert_refused_naming(status, &stderr, img.path(), secs);
    assert!(stderr.contains("given twice"), "{stderr}");
    // Twice readonly is two readers, which share.
    let ro = format!("{spec},readonly");
    let (status, stderr, _) = ringvm_short(&[&ro, &ro]);
    assert_eq!(status, 1, "stderr: {stderr}");
}

#[test]
fn test_ringvm_refused_while_qemu_holds_image() {
    if !have_kvm() || !qemu_available("qemu-system-x86_64") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    let spec = format!("path={}", img.path().display());
    {
        let _qemu = hold(qemu_holding(img.path(), false), img.path(), QEMU_LAST_BYTE);
        let (status, stderr, secs) = ringvm_short(&[&spec]);
        assert_refused_naming(status, &stderr, img.path(), secs);
        assert!(stderr.contains("qemu-system"), "names QEMU: {stderr}");
        assert!(stderr.contains("\"write\""), "{stderr}");
    }
    // A readonly QEMU refuses a ringvm writer and shares with a ringvm reader.
    let _qemu = hold(qemu_holding(img.path(), true), img.path(), QEMU_LAST_BYTE);
    let (status, stderr, secs) = ringvm_short(&[&spec]);
    assert_refused_naming(status, &stderr, img.path(), secs);
    let (status, stderr, _) = ringvm_short(&[&format!("{spec},readonly")]);
    assert_eq!(status, 1, "reader beside a readonly QEMU; stderr: {stderr}");
}

#[test]
fn test_qemu_refused_while_ringvm_holds_image() {
    if !have_kvm() || !qemu_available("qemu-io") || !qemu_available("qemu-system-x86_64") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    let spec = format!("path={}", img.path().display());
    {
        let _ringvm = hold(ringvm_holding(&spec), img.path(), RINGVM_LAST_BYTE);
        let (ok, text) = qemu_io(img.path(), &["-c", "write 0 4k"]);
        assert!(!ok, "qemu-io write must be refused: {text}");
        assert!(text.contains("Failed to get \"write\" lock"), "{text}");
        // A readonly QEMU device does not share "write" either. (qemu-io -r and qemu-img
        // info on a raw image do share it, beside a QEMU writer too: QEMU's rule, not ours.)
        let text = qemu_refused(img.path(), true);
        assert!(
            text.contains("Failed to get shared \"write\" lock"),
            "{text}"
        );
        let text = qemu_refused(img.path(), false);
        assert!(text.contains("Failed to get \"write\" lock"), "{text}");
    }
    wait_unlocked(img.path(), RINGVM_LAST_BYTE);
    // ringvm readonly: QEMU readers share, QEMU writers are refused.
    let _ringvm = hold(
        ringvm_holding(&format!("{spec},readonly")),
        img.path(),
        RINGVM_LAST_BYTE,
    );
    let (ok, text) = qemu_io(img.path(), &["-r", "-c", "read 0 4k"]);
    assert!(ok, "QEMU reader beside a ringvm reader: {text}");
    let (ok, text) = qemu_io(img.path(), &["-c", "write 0 4k"]);
    assert!(!ok, "QEMU writer beside a ringvm reader: {text}");
}

#[test]
fn test_bench_matrix_on_one_image_releases_lock_between_jobs() {
    if !have_kvm() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    // The default matrix: four VMs in one process, one after the other, on the same image.
    // Each VM's io_uring keeps the file open until the kernel tears its ring down, so the
    // lock must go when the VM stops, not when the file closes.
    let r = run(&[
        "bench",
        "--disk",
        &img.path().to_string_lossy(),
        "--runtime",
        "0.3",
    ]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert_eq!(
        r.stdout
            .lines()
            .filter(|l| l.starts_with("4k ") || l.starts_with("128k "))
            .count(),
        4,
        "every job ran: {}",
        r.stdout
    );
}
