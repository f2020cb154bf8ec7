//! The bare-metal guests built from `guests/` and embedded in the binary, so `ringvm bench`
//! and the tests need no other file. ringvm loads them from memory
//! ([`crate::boot::KernelImage::Embedded`]); they are never written to disk.

/// The test guest: prints, then exits through the debug-exit port (see guests/README.md).
pub static HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello"));
/// The storage benchmark guest (see guests/README.md).
pub static BLKBENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blkbench"));

/// The network benchmark guest: ping, UDP flood, echo (see guests/README.md).
pub static NETBENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/netbench"));
