//! perf/compare's --vmm, --guest-params and the Cloud Hypervisor and Firecracker adapters:
//! the dry run shows each contender's exact command (no VMM needed), and with
//! RINGVM_CH=PATH / RINGVM_FC=PATH one short verified round really runs under that peer;
//! without a path those runs are skipped with a message.

use std::process::Command;

const COMPARE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/perf/compare");

fn compare(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(COMPARE)
        .args(args)
        .output()
        .expect("run perf/compare");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The dry run's line for `name` in round 1.
fn dry_line<'a>(stdout: &'a str, name: &str) -> &'a str {
    let prefix = format!("round 1/1 {name}: ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} line in: {stdout}"))
}

#[test]
fn test_compare_vmm_without_peer_paths_skips_them_with_a_message() {
    let (code, stdout, stderr) = compare(&[
        "--dry-run",
        "--rounds",
        "1",
        "--vmm",
        "ringvm,qemu,fio,ch,fc",
    ]);
    assert_eq!(code, 0, "{stderr}");
    for skipped in ["ch", "fc"] {
        assert!(
            stderr.contains(&format!(
                "skip {skipped}: no binary given (--vmm {skipped}=PATH)"
            )),
            "{stderr}"
        );
        assert!(
            !stdout.contains(&format!("round 1/1 {skipped}:")),
            "{stdout}"
        );
    }
    assert!(dry_line(&stdout, "ringvm").contains(" bench "));
    assert!(dry_line(&stdout, "qemu").contains("qemu-blkbench.sh rw=randread"));
    assert!(dry_line(&stdout, "fio").contains("--ioengine=io_uring"));
}

#[test]
fn test_compare_peer_commands_carry_job_guest_params_and_pinning() {
    let (code, stdout, stderr) = compare(&[
        "--dry-run",
        "--rounds",
        "1",
        "--qd",
        "8",
        "--queues",
        "1",
        "--vcpu-core",
        "0",
        "--io-core",
        "1",
        "--guest-params",
        "verify=1 qsize=128",
        "--vmm",
        "ringvm,ch=/opt/ch/cloud-hypervisor,fc=/opt/fc/firecracker",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let ch = dry_line(&stdout, "ch");
    for want in [
        "/opt/ch/cloud-hypervisor --kernel ",
        "qd=8 queues=1",
        "verify=1 qsize=128 tsc_khz=",
        "boot=1,affinity=[0@[0]]",
        "num_queues=1,queue_size=256,direct=on,image_type=raw,queue_affinity=[0@[1]]",
        "--serial tty",
    ] {
        assert!(ch.contains(want), "ch command lacks {want}: {ch}");
    }
    let fc = dry_line(&stdout, "fc");
    for want in [
        "/opt/fc/firecracker --no-api --config-file ",
        "--enable-pci",
        "\"io_engine\": \"Async\"",
        "\"is_root_device\": false",
        "verify=1 qsize=128 tsc_khz=",
        "\"vcpu_count\": 1",
    ] {
        assert!(fc.contains(want), "fc command lacks {want}: {fc}");
    }
    // ringvm bench takes no guest parameters: the same job goes through ringvm run.
    let ringvm = dry_line(&stdout, "ringvm");
    assert!(
        ringvm.contains(" run --kernel ") && ringvm.contains("verify=1 qsize=128"),
        "{ringvm}"
    );
}

#[test]
fn test_compare_bad_vmm_lists_are_one_line_errors() {
    let (code, _, stderr) = compare(&["--dry-run", "--vmm", "ringvm,bhyve"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown contender bhyve"), "{stderr}");
    let (code, _, stderr) = compare(&["--vmm", "ch=/nonexistent/ch"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("ch=/nonexistent/ch: not an executable file"),
        "{stderr}"
    );
    let (code, _, stderr) = compare(&["--dry-run", "--vmm", "qemu=/usr/bin/qemu"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("only ch and fc take a path"), "{stderr}");
}

/// One short verified round under the peer whose binary `var` names.
fn real_round(var: &str, name: &str) {
    let Some(bin) = std::env::var_os(var) else {
        eprintln!(
            "SKIP: set {var}=PATH to run blkbench under {name} (perf/compare --vmm {name}=PATH)"
        );
        return;
    };
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: this test needs /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let vmm = format!("{name}={}", bin.to_string_lossy());
    let (code, stdout, stderr) = compare(&[
        "--vmm",
        &vmm,
        "--rounds",
        "1",
        "--runtime",
        "1",
        "--qd",
        "8",
        "--rw",
        "randwrite",
        "--disk",
        disk.to_str().unwrap(),
        "--size",
        "64M",
        "--guest-params",
        "verify=1",
        "--no-append",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no {name} row: {stdout}"));
    let iops: f64 = row
        .split('|')
        .nth(2)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(iops > 0.0, "{row}");
    assert!(
        stderr.contains(&format!("{name}: pinned ")),
        "the adapter reports its pinning: {stderr}"
    );
}

#[test]
fn test_compare_cloud_hypervisor_round_when_given() {
    real_round("RINGVM_CH", "ch");
}

#[test]
fn test_compare_firecracker_round_when_given() {
    real_round("RINGVM_FC", "fc");
}
