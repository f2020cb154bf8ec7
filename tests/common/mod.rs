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

/// A network namespace with its loopback up, deleted (with everything in it) when dropped;
/// `None` (after a SKIP line) where namespaces cannot be made.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Option<Netns> {
        let name = format!("rvt{}{tag}", std::process::id() % 100_000);
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP: cannot create network namespace {name} (needs root and iproute2)");
            return None;
        }
        let ns = Netns(name);
        let _ = ns.exec(&["ip", "link", "set", "lo", "up"]).status();
        Some(ns)
    }

    /// `args` run inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
