//! Fixture for tests that boot a guest: runs the ringvm binary on an embedded guest.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn ringvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringvm"))
}

/// True when /dev/kvm can be opened; tests that need it print why they are skipped
/// otherwise (CI on this machine always has it).
pub fn have_kvm() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: this test needs /dev/kvm ({e})");
            false
        }
    }
}

/// Writes an embedded guest to a temp file and returns its path.
pub fn guest(name: &str) -> PathBuf {
    let elf = match name {
        "hello" => ringvm::guests::HELLO,
        "blkbench" => ringvm::guests::BLKBENCH,
        "netbench" => ringvm::guests::NETBENCH,
        _ => panic!("unknown guest {name}"),
    };
    let dir = std::env::temp_dir().join(format!("ringvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    if !p.exists() {
        let tmp = dir.join(format!("{name}.{:?}", std::thread::current().id()));
        std::fs::write(&tmp, elf).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }
    p
}

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(args: &[&str]) -> Run {
    let out: Output = ringvm().args(args).output().expect("spawn ringvm");
    let r = Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !r.stderr.contains("panicked"),
        "ringvm panicked: {}",
        r.stderr
    );
    r
}
