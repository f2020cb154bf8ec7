//! 64-bit BARs above 4 GiB: blkbench verifies a disk under ringvm with its virtio-pci BAR
//! placed high by the VMM (`--pci-bars high`, `--pci-mmio64-base`) and moved high by the
//! guest (`bar64=`, both dwords of the BAR), and under QEMU 10 with the BAR moved high by
//! the guest (QEMU's firmware leaves it below 4 GiB). QEMU is skipped with a message when it
//! is missing, unless RINGVM_REQUIRE_QEMU=1 (scripts/test.sh sets it after installing it).

mod common;

use std::process::{Command, Stdio};

use common::{guest, have_kvm, run};

const GIB: u64 = 1 << 30;

/// A 64 MiB disk file on a filesystem with O_DIRECT (the target dir, not tmpfs).
fn disk() -> tempfile::NamedTempFile {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(64 << 20).unwrap();
    f
}

fn result_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"blkbench\":"))
        .unwrap_or_else(|| panic!("no result line in: {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// Writes a stamped pattern, then reads and checks it, with the same VMM options and guest
/// parameters; returns both results.
fn write_then_verify_ringvm(
    vmm: &[&str],
    guest_params: &str,
) -> (serde_json::Value, serde_json::Value) {
    let d = disk();
    let blkbench = guest("blkbench").to_string_lossy().into_owned();
    let spec = format!("path={}", d.path().display());
    let mut results = Vec::new();
    for rw in ["randwrite", "randread"] {
        let cmdline = format!("rw={rw} bs=4k qd=8 ios=2000 size=16m verify=1 {guest_params}");
        let mut args = vec![
            "run",
            "--kernel",
            &blkbench,
            "--memory",
            "256M",
            "--disk",
            &spec,
            "--cmdline",
            &cmdline,
        ];
        args.extend_from_slice(vmm);
        let r = run(&args);
        assert_eq!(
            r.status, 1,
            "blkbench should exit 0 (status 1) with {vmm:?} {guest_params}; stdout: {} stderr: {}",
            r.stdout, r.stderr
        );
        let j = result_line(&r.stdout);
        assert_eq!(j["verify"], "ok", "{rw}: {j}");
        assert_eq!(j["errors"], 0, "{rw}: {j}");
        results.push(j);
    }
    let read = results.pop().unwrap();
    assert!(
        read["verify_sectors"].as_u64().unwrap() > 0,
        "the reads checked stamped blocks: {read}"
    );
    (results.pop().unwrap(), read)
}

fn common_cfg(j: &serde_json::Value) -> u64 {
    j["device"]["common_cfg"].as_u64().unwrap()
}

#[test]
fn test_bar64_ringvm_high_window_default_base_verifies() {
    if !have_kvm() {
        return;
    }
    let (w, r) = write_then_verify_ringvm(&["--pci-bars", "high"], "");
    for j in [&w, &r] {
        // 256 MiB of RAM: the window starts at the first GiB above 4 GiB.
        assert_eq!(
            common_cfg(j),
            4 * GIB,
            "BAR 0 (common config at offset 0): {j}"
        );
        assert_eq!(
            j["device"]["bar_relocated"], false,
            "the guest kept it: {j}"
        );
    }
}

#[test]
fn test_bar64_ringvm_at_256g_like_firecracker_verifies() {
    if !have_kvm() {
        return;
    }
    let (w, r) = write_then_verify_ringvm(&["--pci-mmio64-base", "256G"], "");
    for j in [&w, &r] {
        assert_eq!(common_cfg(j), 256 * GIB, "{j}");
        assert_eq!(j["device"]["bar_relocated"], false, "{j}");
    }
}

/// The guest moves the 64-bit BAR to 1 TiB (a second PML4 entry in its page tables):
/// ringvm must honour the move written as two dwords.
#[test]
fn test_bar64_ringvm_honours_guest_move_to_1t() {
    if !have_kvm() {
        return;
    }
    let (w, r) = write_then_verify_ringvm(&["--pci-bars", "high"], "bar64=1t");
    for j in [&w, &r] {
        assert_eq!(common_cfg(j), 1024 * GIB, "{j}");
        assert_eq!(j["device"]["bar_relocated"], true, "{j}");
    }
}

#[test]
fn test_bar64_bad_window_base_is_a_one_line_error() {
    let r = run(&["run", "--kernel", "/nonexistent", "--pci-mmio64-base", "1G"]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("--pci-mmio64-base '1G'") && r.stderr.contains("below 0x100000000"),
        "names the option and the problem: {}",
        r.stderr
    );
}

fn qemu_available() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok && have_kvm() {
        return true;
    }
    let why = "SKIP: this test needs qemu-system-x86_64 and /dev/kvm (perf/qemu-blkbench.sh installs QEMU 10)";
    assert!(
        std::env::var("RINGVM_REQUIRE_QEMU").as_deref() != Ok("1"),
        "{why}, and RINGVM_REQUIRE_QEMU=1"
    );
    eprintln!("{why}");
    false
}

/// Writes then reads back a stamped pattern with blkbench under QEMU 10
/// (perf/qemu-blkbench.sh); returns both results.
fn write_then_verify_qemu(guest_params: &str, qemu_extra: &str) -> Vec<serde_json::Value> {
    let d = disk();
    let kernel = guest("blkbench");
    let mut results = Vec::new();
    for rw in ["randwrite", "randread"] {
        let mut params = vec![format!("rw={rw}")];
        params.extend(
            format!("bs=4k qd=8 ios=2000 size=16m verify=1 {guest_params}")
                .split_whitespace()
                .map(String::from),
        );
        let out = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/perf/qemu-blkbench.sh"
        ))
        .args(&params)
        .env("IMG", d.path())
        .env("KERNEL", &kernel)
        .env("PIN", "0")
        .env("TIMEOUT", "120")
        .env("QEMU_EXTRA", qemu_extra)
        .env(
            "LOG",
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
                "bar64-qemu-{}-{rw}-{}.log",
                std::process::id(),
                qemu_extra.len()
            )),
        )
        .output()
        .expect("run perf/qemu-blkbench.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "blkbench under QEMU ({rw} {guest_params} {qemu_extra}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = result_line(&stdout);
        assert_eq!(j["verify"], "ok", "{j}");
        assert_eq!(j["errors"], 0, "{j}");
        results.push(j);
    }
    results
}

/// QEMU's virtio-pci BAR 4 is 64-bit (prefetchable); its firmware assigns it below 4 GiB,
/// so blkbench moves it to 256 GiB itself and maps it there.
#[test]
fn test_bar64_qemu_guest_moves_bar_to_256g_and_verifies() {
    if !qemu_available() {
        return;
    }
    for j in write_then_verify_qemu("bar64=256g", "") {
        assert_eq!(common_cfg(&j) & !(GIB - 1), 256 * GIB, "{j}");
        assert_eq!(j["device"]["bar_relocated"], true, "{j}");
    }
}

/// With 5 GiB of RAM, QEMU's firmware puts the 64-bit BAR at the top of the address space
/// (0x3800_0000_0000 here): blkbench uses it there.
#[test]
fn test_bar64_qemu_firmware_places_bar_high_and_blkbench_maps_it() {
    if !qemu_available() {
        return;
    }
    for j in write_then_verify_qemu("", "-m 5G") {
        assert!(common_cfg(&j) >= 4 * GIB, "above 4 GiB: {j}");
        assert_eq!(
            j["device"]["bar_relocated"], false,
            "used where it was: {j}"
        );
    }
}
