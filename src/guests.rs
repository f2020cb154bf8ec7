//! The bare-metal guests built from `guests/` and embedded in the binary, so `ringvm bench`
//! and the tests need no other file.

/// The test guest: prints, then exits through the debug-exit port (see guests/README.md).
pub static HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello"));
/// The storage benchmark guest (see guests/README.md).
pub static BLKBENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blkbench"));

/// The network benchmark guest: ping, UDP flood, echo (see guests/README.md).
pub static NETBENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/netbench"));

/// Writes `elf` to a private temporary file and returns its path (the loader reads files).
pub fn materialize(name: &str, elf: &[u8]) -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("ringvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, elf)?;
    Ok(path)
}
