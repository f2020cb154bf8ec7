//! The null back end: every request completes at once with OK and no data is moved. It
//! measures what the VMM itself costs per request (parse, slot, used ring, interrupt).

/// A disk of `capacity_sectors` that stores nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullBackend {
    pub capacity_sectors: u64,
}
