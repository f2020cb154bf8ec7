//! blkbench's device-independent parts, kept in the library so they are
//! unit-tested on the host: parameter parsing and verify stamps.

pub mod params;
pub mod stamp;
