//! `ringvm bench`: jobs for the embedded blkbench guest (or fio in the Linux guest, `fio`), its JSON result, and the table a
//! storage engineer reads (guest-side latency next to the host-side reactor histograms).

pub mod fio;
pub mod job;
pub mod result;

pub use job::{Job, Rw};
pub use result::{GuestResult, JobResult, ResultError};
