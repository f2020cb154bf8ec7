//! Boots the test guest (guests/src/bin/hello.rs) in ringvm and checks console, exit
//! status, hugepage backing, pinning and every start-up error.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{guest, have_kvm, run};

fn hello() -> String {
    guest("hello").to_string_lossy().into_owned()
}

#[test]
fn test_hello_prints_console_and_exits_with_debug_exit_status() {
    if !have_kvm() {
        return;
    }
    let r = run(&[
        "run",
        "--kernel",
        &hello(),
        "--cmdline",
        "exit=3 marker=xyz",
        "--hugepages",
        "none",
    ]);
    assert!(
        r.stdout.contains("ringvm-hello: ring3 ok"),
        "stdout: {}",
        r.stdout
    );
    assert!(
        r.stdout.contains("cmdline: exit=3 marker=xyz"),
        "stdout: {}",
        r.stdout
    );
    assert!(r.stdout.contains("bye"), "stdout: {}", r.stdout);
    assert_eq!(r.status, (3 << 1) | 1);
}

#[test]
fn test_ring0_cmpxchg16b_completed_for_the_host_emulator() {
    if !have_kvm() {
        return;
    }
    // hello runs one `lock cmpxchg16b` in ring 0; on this lab's host the emulator refuses it
    // and ringvm completes it (elsewhere the CPU runs it): either way the swap must be right.
    let r = run(&["run", "--kernel", &hello()]);
    assert!(
        r.stdout.contains("ring0 cmpxchg16b: swapped"),
        "stdout: {}",
        r.stdout
    );
    assert_eq!(r.status, 1);
}

#[test]
fn test_user_mode_syscall_reaches_ring0_and_returns() {
    if !have_kvm() {
        return;
    }
    // hello's ring 3 runs `syscall` into a supervisor-only entry that reads CR3 and
    // `sysretq`s. This lab's host leaves the syscall at CPL 3 and the fetch faults; ringvm
    // finishes it at the #PF (vmm::pvm_host::syscall_trap). Elsewhere the CPU does it all.
    let r = run(&[
        "run",
        "--kernel",
        &hello(),
        "--cmdline",
        "mode=syscall exit=5",
    ]);
    assert!(
        r.stdout.contains("syscall: ring 0 (cs 0x10, cr3 0x"),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    // FMASK (Linux's 0x47700) cleared IF, IOPL, TF, DF, AC, NT in the handler.
    assert!(r.stdout.contains("rflags 0x"), "stdout: {}", r.stdout);
    let flags = r
        .stdout
        .split("rflags ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap();
    let flags = u64::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 0x47700, 0, "RFLAGS in the handler: {flags:#x}");
    assert!(r.stdout.contains("sysret ok"), "stdout: {}", r.stdout);
    assert_eq!(r.status, (5 << 1) | 1, "stdout: {}", r.stdout);
}

#[test]
fn test_hello_sees_memory_map_of_requested_size() {
    if !have_kvm() {
        return;
    }
    let r = run(&["run", "--kernel", &hello(), "--memory", "256M"]);
    // 256 MiB less the reserved 384 KiB between the EBDA and 1 MiB.
    assert!(
        r.stdout.contains("memmap: 4 entries, 255 MiB"),
        "stdout: {}",
        r.stdout
    );
    assert_eq!(r.status, 1);
}

#[test]
fn test_boot_to_exit_is_fast() {
    if !have_kvm() {
        return;
    }
    let t = Instant::now();
    let r = run(&["run", "--kernel", &hello(), "--serial", "none"]);
    assert_eq!(r.status, 1);
    // Generous bound for a loaded CI machine; the typical time is a few tens of ms.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn test_triple_fault_stops_vm_with_message() {
    if !have_kvm() {
        return;
    }
    let r = run(&["run", "--kernel", &hello(), "--cmdline", "mode=triple"]);
    assert!(
        r.stderr.contains("shut down (triple fault)"),
        "stderr: {}",
        r.stderr
    );
    assert_eq!(r.status, 2);
}

#[test]
fn test_i8042_reset_stops_vm() {
    if !have_kvm() {
        return;
    }
    let r = run(&["run", "--kernel", &hello(), "--cmdline", "mode=reset"]);
    assert!(r.stderr.contains("reset (i8042)"), "stderr: {}", r.stderr);
    assert_eq!(r.status, 0);
}

#[test]
fn test_halt_with_interrupts_disabled_stops_vm() {
    if !have_kvm() {
        return;
    }
    let r = run(&["run", "--kernel", &hello(), "--cmdline", "mode=halt"]);
    assert!(
        r.stderr.contains("halted with interrupts disabled"),
        "stderr: {}",
        r.stderr
    );
    assert_eq!(r.status, 2);
}

#[test]
fn test_serial_to_file() {
    if !have_kvm() {
        return;
    }
    let f = tempfile::NamedTempFile::new().unwrap();
    let spec = format!("file:{}", f.path().display());
    let r = run(&["run", "--kernel", &hello(), "--serial", &spec]);
    assert_eq!(r.status, 1);
    assert!(!r.stdout.contains("ring3 ok"));
    let text = std::fs::read_to_string(f.path()).unwrap();
    assert!(text.contains("ringvm-hello: ring3 ok"), "file: {text}");
}

/// Starts a spinning guest and returns the child; the caller kills it.
fn spawn_spinning(extra: &[&str]) -> std::process::Child {
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        hello(),
        "--cmdline".into(),
        "mode=spin".into(),
        "--serial".into(),
        "none".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    common::ringvm().args(&args).spawn().unwrap()
}

fn threads_named(pid: u32, prefix: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid: u32 = e.file_name().to_string_lossy().parse().unwrap();
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with(prefix) {
            v.push(tid);
        }
    }
    v
}

fn cpus_allowed(pid: u32, tid: u32) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

fn wait_for<F: FnMut() -> bool>(mut f: F) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn stop(mut child: std::process::Child) -> i32 {
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap().code().unwrap_or(-1)
}

#[test]
fn test_vcpu_threads_named_and_pinned() {
    if !have_kvm() {
        return;
    }
    let child = spawn_spinning(&["--vcpus", "2", "--vcpu-affinity", "1,0"]);
    let pid = child.id();
    assert!(
        wait_for(|| threads_named(pid, "vcpu").len() == 2),
        "two vcpu threads"
    );
    for tid in threads_named(pid, "vcpu") {
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        let expect = if name.trim() == "vcpu0" { "1" } else { "0" };
        assert_eq!(cpus_allowed(pid, tid), expect, "{}", name.trim());
    }
    assert_eq!(
        stop(child),
        128 + libc::SIGTERM,
        "SIGTERM ends the VM in order"
    );
}

#[test]
fn test_hugepages_2m_back_guest_memory() {
    if !have_kvm() {
        return;
    }
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert!(
        free >= 64,
        "this test needs 64 free 2M hugepages: run scripts/setup-hugepages.sh (CI does)"
    );
    let child = spawn_spinning(&["--memory", "128M", "--hugepages", "2M", "--prefault"]);
    let pid = child.id();
    let mut huge_kb = 0u64;
    let found = wait_for(|| {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        // Sum the sizes of mappings whose kernel page size is 2 MiB.
        huge_kb = 0;
        let mut size_kb = 0;
        for l in smaps.lines() {
            if let Some(v) = l.strip_prefix("Size:") {
                size_kb = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            } else if l
                .strip_prefix("KernelPageSize:")
                .is_some_and(|v| v.trim() == "2048 kB")
            {
                huge_kb += size_kb;
            }
        }
        huge_kb >= 128 * 1024
    });
    stop(child);
    assert!(found, "expected 128 MiB of 2 MiB pages, saw {huge_kb} kB");
}

#[test]
fn test_hugepages_not_reserved_says_how_to_fix() {
    if !have_kvm() {
        return;
    }
    let r = run(&[
        "run",
        "--kernel",
        &hello(),
        "--memory",
        "1024G",
        "--hugepages",
        "1G",
    ]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("hugepages")
            && (r.stderr.contains("setup-hugepages.sh") || r.stderr.contains("not supported")),
        "stderr: {}",
        r.stderr
    );
}

fn expect_error(args: &[&str], needle: &str) {
    let r = run(args);
    assert_ne!(r.status, 0, "should fail: {args:?}");
    assert!(
        r.stderr.contains(needle),
        "expected '{needle}' in: {}",
        r.stderr
    );
    assert_eq!(
        r.stderr.trim().lines().count(),
        1,
        "one-line error, got: {}",
        r.stderr
    );
}

#[test]
fn test_missing_kvm_device_says_what_to_do() {
    let out = common::ringvm()
        .args(["run", "--kernel", &hello()])
        .env("RINGVM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("/nonexistent/kvm does not exist: load the kvm module"),
        "stderr: {err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn test_not_a_kvm_device_is_a_clear_error() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let out = common::ringvm()
        .args(["run", "--kernel", &hello()])
        .env("RINGVM_KVM_DEVICE", f.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("is not a KVM device"), "stderr: {err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn test_missing_kernel_is_named() {
    expect_error(
        &["run", "--kernel", "/nonexistent/kernel"],
        "Cannot open kernel /nonexistent/kernel",
    );
}

#[test]
fn test_garbage_kernel_is_rejected() {
    if !have_kvm() {
        return;
    }
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&[0x42; 8192]).unwrap();
    expect_error(
        &["run", "--kernel", f.path().to_str().unwrap()],
        "neither a PVH ELF nor a Linux kernel",
    );
}

#[test]
fn test_corrupt_elf_is_rejected() {
    if !have_kvm() {
        return;
    }
    let mut elf = ringvm::guests::HELLO.to_vec();
    elf.truncate(200);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&elf).unwrap();
    expect_error(&["run", "--kernel", f.path().to_str().unwrap()], "corrupt");
}

#[test]
fn test_initrd_that_does_not_fit_is_rejected() {
    if !have_kvm() {
        return;
    }
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(64 << 20).unwrap();
    expect_error(
        &[
            "run",
            "--kernel",
            &hello(),
            "--memory",
            "32M",
            "--initrd",
            f.path().to_str().unwrap(),
        ],
        "does not fit",
    );
}

#[test]
fn test_memory_too_small_is_rejected() {
    expect_error(
        &["run", "--kernel", &hello(), "--memory", "1M"],
        "at least 16M",
    );
}

#[test]
fn test_memory_not_page_multiple_is_rejected() {
    expect_error(
        &[
            "run",
            "--kernel",
            &hello(),
            "--memory",
            "100M",
            "--hugepages",
            "1G",
        ],
        "not a multiple",
    );
}

#[test]
fn test_invalid_size_is_rejected() {
    expect_error(
        &["run", "--kernel", &hello(), "--memory", "512Q"],
        "Invalid size '512Q'",
    );
}

#[test]
fn test_too_many_vcpus_is_rejected() {
    expect_error(
        &["run", "--kernel", &hello(), "--vcpus", "5000"],
        "more than KVM allows",
    );
}

#[test]
fn test_affinity_naming_missing_core_is_rejected() {
    expect_error(
        &["run", "--kernel", &hello(), "--vcpu-affinity", "999"],
        "names core 999",
    );
}

#[test]
fn test_help_documents_every_option_with_defaults() {
    let r = run(&["run", "--help"]);
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--vcpus",
        "--vcpu-affinity",
        "--hugepages",
        "--prefault",
        "--serial",
        "--disk",
        "--io-cores",
    ] {
        assert!(r.stdout.contains(opt), "--help lacks {opt}");
    }
    for default in ["512M", "[default: 1]", "[default: thp]", "[default: stdio]"] {
        assert!(r.stdout.contains(default), "--help lacks {default}");
    }
}
