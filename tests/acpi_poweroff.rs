//! A guest powers the VM off through ACPI as Linux does on a hardware-reduced platform:
//! hello's `mode=poweroff` follows RSDP → XSDT → FADT to SLEEP_CONTROL_REG, reads SLP_TYP
//! from the DSDT's `\_S5` and writes `SLP_TYP << 2 | SLP_EN` there (src/boot/acpi.rs,
//! src/devices/legacy/acpi_sleep.rs).

mod common;

use common::{guest, have_kvm, run};

#[test]
fn test_acpi_poweroff_from_guest_ends_vm_with_status_zero() {
    if !have_kvm() {
        return;
    }
    let hello = guest("hello").to_string_lossy().into_owned();
    let r = run(&[
        "run",
        "--kernel",
        &hello,
        "--cmdline",
        "mode=poweroff",
        "--hugepages",
        "none",
    ]);
    assert!(
        r.stdout
            .contains("acpi: sleep control port 0x600, S5 sleep type 5"),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(
        !r.stdout.contains("poweroff failed"),
        "stdout: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains("guest powered off (ACPI S5)"),
        "stderr: {}",
        r.stderr
    );
    assert_eq!(r.status, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
}
