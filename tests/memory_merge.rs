//! `--memory-merge`: two VMs with identical memory (the same guest, prefaulted) run side by
//! side with their RAM offered to KSM, and a third without the flag beside them. KSM must
//! merge pages of both merging VMs (the host's `pages_sharing` rises, and each one's
//! `/proc/PID/ksm_merging_pages` is above zero) and none of the third's.
//!
//! The test turns KSM on (`/sys/kernel/mm/ksm/run` = 1) and scans faster while it runs, then
//! puts every setting back; it is skipped with a message where KSM is missing or read-only.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, have_kvm, ringvm};

const KSM: &str = "/sys/kernel/mm/ksm";
/// How long KSM gets to merge (a few full scans of the three guests at the rate set below).
const MERGE_WAIT: Duration = Duration::from_secs(60);
/// Scan rate while the test runs: pages per wake-up and the sleep between wake-ups.
const PAGES_TO_SCAN: &str = "2000";
const SLEEP_MS: &str = "10";

fn read(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// KSM's settings as found, written back on drop.
struct KsmSettings {
    saved: Vec<(String, String)>,
}

impl KsmSettings {
    /// Turns KSM on and scans faster; None (and a SKIP line) where that is not possible.
    fn enable() -> Option<KsmSettings> {
        if !std::path::Path::new(KSM).exists() {
            eprintln!("SKIP: this kernel has no KSM ({KSM} is missing)");
            return None;
        }
        let mut s = KsmSettings { saved: Vec::new() };
        for (name, value) in [
            ("pages_to_scan", PAGES_TO_SCAN),
            ("sleep_millisecs", SLEEP_MS),
            ("run", "1"),
        ] {
            let path = format!("{KSM}/{name}");
            let old = std::fs::read_to_string(&path).ok()?.trim().to_string();
            if let Err(e) = std::fs::write(&path, value) {
                eprintln!("SKIP: cannot turn KSM on ({path}: {e})");
                return None;
            }
            s.saved.push((path, old));
        }
        Some(s)
    }
}

impl Drop for KsmSettings {
    fn drop(&mut self) {
        for (path, old) in self.saved.iter().rev() {
            if let Err(e) = std::fs::write(path, old) {
                eprintln!("cannot restore {path} to {old}: {e}");
            }
        }
    }
}

/// A ringvm running hello in `mode=spin` (at low priority: it keeps a core busy), stopped
/// with SIGTERM on drop.
struct Vm(Child);

impl Vm {
    fn start(merge: bool) -> Vm {
        let hello = guest("hello");
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19"])
            .arg(ringvm().get_program())
            .args(["run", "--kernel"])
            .arg(&hello)
            .args([
                "--cmdline",
                "mode=spin",
                "--memory",
                "32M",
                "--hugepages",
                "none",
                "--prefault",
                "--serial",
                "none",
            ]);
        if merge {
            cmd.arg("--memory-merge");
        }
        Vm(cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringvm"))
    }

    fn merging_pages(&self) -> Option<u64> {
        read(&format!("/proc/{}/ksm_merging_pages", self.0.id()))
    }

    /// Panics with the VM's status and stderr if it has stopped.
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = self.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("a VM stopped early ({status}): {err}");
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which it keeps until we wait for it.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn test_memory_merge_two_identical_vms_share_pages_and_plain_vm_does_not() {
    if !have_kvm() {
        return;
    }
    if read("/proc/self/ksm_merging_pages").is_none() {
        return eprintln!("SKIP: this kernel has no /proc/PID/ksm_merging_pages (Linux 6.1+)");
    }
    let Some(_ksm) = KsmSettings::enable() else {
        return;
    };
    let before = read(&format!("{KSM}/pages_sharing")).unwrap();
    let mut vms = [Vm::start(true), Vm::start(true), Vm::start(false)];
    let t = Instant::now();
    let merged = |vms: &[Vm]| vms[..2].iter().all(|v| v.merging_pages().unwrap_or(0) > 0);
    while !merged(&vms) && t.elapsed() < MERGE_WAIT {
        vms.iter_mut().for_each(Vm::check_running);
        std::thread::sleep(Duration::from_millis(200));
    }
    let pages: Vec<Option<u64>> = vms.iter().map(Vm::merging_pages).collect();
    let after = read(&format!("{KSM}/pages_sharing")).unwrap();
    eprintln!(
        "ksm_merging_pages (merge, merge, plain): {pages:?}; pages_sharing {before} -> {after} \
         after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        pages[0].unwrap_or(0) > 0 && pages[1].unwrap_or(0) > 0,
        "KSM merged no page of a --memory-merge VM within {MERGE_WAIT:?}: {pages:?}"
    );
    assert_eq!(
        pages[2],
        Some(0),
        "the VM without --memory-merge had pages merged"
    );
    assert!(
        after > before,
        "pages_sharing did not rise: {before} -> {after}"
    );
}
