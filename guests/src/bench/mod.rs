//! The benchmarks' device-independent parts, kept in the library so they are
//! unit-tested on the host: blkbench and netbench parameters, verify stamps.

pub mod netparams;
pub mod params;
pub mod stamp;
