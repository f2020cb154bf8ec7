//! The benchmarks' device-independent parts, kept in the library so they are
//! unit-tested on the host: blkbench and netbench parameters, verify stamps, the
//! chaos cases' verdicts and the durability bookkeeping.

pub mod chaos;
pub mod durable;
pub mod netparams;
pub mod params;
pub mod stamp;
