//! ringvm: a KVM virtual machine monitor for I/O performance labs.
//!
//! The crate is a library (so integration tests, benches and fuzz targets can reach the
//! device models without KVM) plus a thin binary in `main.rs`.

pub mod api;
pub mod bench;
pub mod boot;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod error;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod guests;
pub mod metrics;
pub mod reactor;
pub mod report;
pub mod seccomp;
pub mod vhost;
pub mod vmm;
