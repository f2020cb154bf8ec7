//! Builds the bare-metal guests in `guests/` (their own cargo workspace, built for the host
//! target with a custom linker script) so the ringvm binary can embed them, and leaves a
//! copy of each ELF in `<target dir>/guests/` for running under other VMMs.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &["hello", "blkbench", "netbench"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let guests_dir = manifest_dir.join("guests");
    for p in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guests_dir.join(p).display());
    }
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&guests_dir)
        .args(["build", "--release", "--offline", "--target-dir"])
        .arg(&target_dir)
        // The outer build's flags (coverage, sanitizers, target features) are not for a guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("failed to run cargo for guests/");
    assert!(status.success(), "building the guests in guests/ failed");
    let shared = shared_guest_dir(&manifest_dir);
    for g in GUESTS {
        let elf = target_dir.join("release").join(g);
        std::fs::copy(&elf, out_dir.join(g))
            .unwrap_or_else(|e| panic!("copy {}: {e}", elf.display()));
        if let Some(dir) = &shared {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::copy(&elf, dir.join(g));
        }
    }
}

/// `<target dir>/guests`, the documented place for the guest ELFs.
fn shared_guest_dir(manifest_dir: &Path) -> Option<PathBuf> {
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("target"));
    Some(target.join("guests"))
}
