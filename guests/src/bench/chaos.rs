//! blkbench `chaos=1`: the hostile-driver cases, what a device may answer to each,
//! and the verdict. The device-facing half (building the malformed chains) lives in
//! `bin/blkbench/chaos.rs`; this half is pure and unit-tested on the host.
//!
//! The spec rarely names one answer for a malformed request. What it does name:
//! a request the device understands but refuses (beyond the capacity, a write to a
//! read-only disk) completes with `VIRTIO_BLK_S_IOERR`, an unknown type with
//! `VIRTIO_BLK_S_UNSUPP` (virtio 1.2, 5.2.6.1-2); a device in an error state it cannot
//! recover from *should* set DEVICE_NEEDS_RESET (2.1.2). For chains the device cannot
//! even walk (loops, nested tables, no writable status byte) there is no status byte to
//! write, so completing the chain with used length 0 and the status untouched is as
//! defensible as NEEDS_RESET. Never acceptable: no answer at all (a hang), an OK for a
//! request the device cannot have served, or a device that stops serving later requests.

/// What the device did with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A used entry, and the status byte was written with this value.
    Status(u8),
    /// A used entry (with this used length), but the status byte was left alone.
    NoStatus(u32),
    /// DEVICE_NEEDS_RESET was set (whether or not a used entry came).
    NeedsReset,
    /// Neither a used entry nor NEEDS_RESET within the case's time limit.
    Timeout,
    /// The device did not come back after a reset (setup failed).
    SetupFailed,
}

impl Answer {
    pub fn name(self) -> &'static str {
        match self {
            Answer::Status(0) => "ok",
            Answer::Status(1) => "ioerr",
            Answer::Status(2) => "unsupp",
            Answer::Status(_) => "bad_status",
            Answer::NoStatus(_) => "no_status",
            Answer::NeedsReset => "needs_reset",
            Answer::Timeout => "timeout",
            Answer::SetupFailed => "setup_failed",
        }
    }
}

/// Acceptable answers, as a bit set.
pub const OK: u8 = 1;
pub const IOERR: u8 = 2;
pub const UNSUPP: u8 = 4;
pub const NO_STATUS: u8 = 8;
pub const NEEDS_RESET: u8 = 16;

/// One hostile case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// A read whose data buffer lies far outside guest RAM.
    DataOutsideRam,
    /// A read whose status byte lies outside guest RAM.
    StatusOutsideRam,
    /// header → data → header → … (NEXT loops back).
    DescLoop,
    /// An indirect descriptor inside an indirect table.
    IndirectNested,
    /// An indirect table whose length is not a multiple of 16.
    IndirectBadLen,
    /// An indirect table holding a chain longer than the queue and than seg_max
    /// (max(qsize, seg_max) + 2 data buffers).
    IndirectTooLong,
    /// A read with a zero-length data descriptor.
    ZeroLenData,
    /// The status descriptor is device-readable (no WRITE flag).
    StatusReadOnly,
    /// A request type the spec does not define (0xff).
    UnknownType,
    /// A write to a disk that offers VIRTIO_BLK_F_RO (run only on such a disk).
    WriteReadOnly,
    /// A read starting at the capacity.
    BeyondCapacity,
    /// A read that starts inside the disk and ends past it.
    StraddleEnd,
    /// A read whose sector + length overflows 64 bits.
    SectorOverflow,
    /// The avail index jumps more than the queue size ahead.
    AvailJump,
    /// queue_size, queue_desc and queue_enable=0 written after DRIVER_OK, then a normal
    /// write+read: the device must ignore the writes or ask for a reset.
    QueueChangeAfterDriverOk,
}

pub const CASES: [Case; 15] = [
    Case::DataOutsideRam,
    Case::StatusOutsideRam,
    Case::DescLoop,
    Case::IndirectNested,
    Case::IndirectBadLen,
    Case::IndirectTooLong,
    Case::ZeroLenData,
    Case::StatusReadOnly,
    Case::UnknownType,
    Case::WriteReadOnly,
    Case::BeyondCapacity,
    Case::StraddleEnd,
    Case::SectorOverflow,
    Case::AvailJump,
    Case::QueueChangeAfterDriverOk,
];

impl Case {
    pub fn name(self) -> &'static str {
        match self {
            Case::DataOutsideRam => "data_outside_ram",
            Case::StatusOutsideRam => "status_outside_ram",
            Case::DescLoop => "desc_loop",
            Case::IndirectNested => "indirect_nested",
            Case::IndirectBadLen => "indirect_bad_len",
            Case::IndirectTooLong => "indirect_too_long",
            Case::ZeroLenData => "zero_len_data",
            Case::StatusReadOnly => "status_readonly",
            Case::UnknownType => "unknown_type",
            Case::WriteReadOnly => "write_readonly",
            Case::BeyondCapacity => "beyond_capacity",
            Case::StraddleEnd => "straddle_end",
            Case::SectorOverflow => "sector_overflow",
            Case::AvailJump => "avail_jump",
            Case::QueueChangeAfterDriverOk => "queue_change_after_driver_ok",
        }
    }

    /// The answers a correct device may give.
    pub fn accepted(self) -> u8 {
        match self {
            // A buffer the device cannot map: refuse the request or give up on the queue.
            Case::DataOutsideRam => IOERR | NEEDS_RESET,
            // Chains without a usable status byte: nothing to write the status into, so the
            // device must give up on the queue (a used entry alone would leave the driver a
            // stale status byte to read as the answer); a loop or a bad table may still let a
            // device find the status byte and refuse the request.
            Case::StatusOutsideRam | Case::StatusReadOnly => NEEDS_RESET,
            Case::DescLoop | Case::IndirectNested | Case::IndirectBadLen => NEEDS_RESET | IOERR,
            // Longer than the queue (a driver MUST NOT) and seg_max: refusing it is right,
            // serving it is harmless.
            Case::IndirectTooLong => OK | IOERR | NEEDS_RESET,
            // 0 is a multiple of 512: an empty read may succeed or be refused.
            Case::ZeroLenData => OK | IOERR | NEEDS_RESET,
            Case::UnknownType => UNSUPP,
            Case::WriteReadOnly | Case::BeyondCapacity | Case::StraddleEnd | Case::SectorOverflow => IOERR,
            Case::AvailJump => NEEDS_RESET,
            // "ok" here means the normal I/O after the writes worked (they were ignored).
            Case::QueueChangeAfterDriverOk => OK | NEEDS_RESET,
        }
    }

    /// The accepted set as text, e.g. `ioerr|needs_reset`.
    pub fn expected(self, out: &mut [u8; 64]) -> &str {
        let mut n = 0;
        for (bit, name) in [(OK, "ok"), (IOERR, "ioerr"), (UNSUPP, "unsupp"), (NO_STATUS, "no_status"), (NEEDS_RESET, "needs_reset")] {
            if self.accepted() & bit != 0 {
                if n > 0 {
                    out[n] = b'|';
                    n += 1;
                }
                out[n..n + name.len()].copy_from_slice(name.as_bytes());
                n += name.len();
            }
        }
        core::str::from_utf8(&out[..n]).unwrap_or("?")
    }
}

/// Whether `a` is one of the answers `case` allows.
pub fn acceptable(case: Case, a: Answer) -> bool {
    let bit = match a {
        Answer::Status(0) => OK,
        Answer::Status(1) => IOERR,
        Answer::Status(2) => UNSUPP,
        Answer::NoStatus(_) => NO_STATUS,
        Answer::NeedsReset => NEEDS_RESET,
        Answer::Status(_) | Answer::Timeout | Answer::SetupFailed => 0,
    };
    case.accepted() & bit != 0
}

/// The outcome of one case.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub case: Case,
    pub observed: Answer,
    /// Without a reset, a normal write+read (or read on a read-only disk) still worked;
    /// `None` when the device asked for a reset (nothing to check).
    pub served_after: Option<bool>,
    /// After reset and renegotiation a normal write+read (read) worked.
    pub recovered: bool,
    /// Not run (write_readonly on a writable disk).
    pub skipped: bool,
}

impl Outcome {
    pub fn pass(&self) -> bool {
        self.skipped || (acceptable(self.case, self.observed) && self.served_after != Some(false) && self.recovered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_acceptable_hang_never_passes() {
        for c in CASES {
            assert!(!acceptable(c, Answer::Timeout), "{}", c.name());
            assert!(!acceptable(c, Answer::SetupFailed), "{}", c.name());
            assert!(!acceptable(c, Answer::Status(0x7f)), "{}", c.name());
        }
    }

    #[test]
    fn test_acceptable_refused_requests_must_not_succeed() {
        for c in [Case::DataOutsideRam, Case::BeyondCapacity, Case::StraddleEnd, Case::SectorOverflow, Case::WriteReadOnly, Case::UnknownType, Case::StatusReadOnly] {
            assert!(!acceptable(c, Answer::Status(0)), "{}", c.name());
        }
        assert!(acceptable(Case::BeyondCapacity, Answer::Status(1)));
        assert!(acceptable(Case::UnknownType, Answer::Status(2)));
        assert!(!acceptable(Case::UnknownType, Answer::Status(1)));
        assert!(!acceptable(Case::DescLoop, Answer::NoStatus(0)), "a used entry without a status is no answer");
        assert!(!acceptable(Case::StatusReadOnly, Answer::NoStatus(0)));
        assert!(acceptable(Case::DescLoop, Answer::NeedsReset));
        assert!(acceptable(Case::AvailJump, Answer::NeedsReset));
    }

    #[test]
    fn test_outcome_pass_needs_service_after_and_recovery() {
        let base = Outcome { case: Case::DescLoop, observed: Answer::Status(1), served_after: Some(true), recovered: true, skipped: false };
        assert!(base.pass());
        assert!(!Outcome { served_after: Some(false), ..base }.pass());
        assert!(!Outcome { recovered: false, ..base }.pass());
        assert!(Outcome { observed: Answer::NeedsReset, served_after: None, ..base }.pass());
        assert!(Outcome { observed: Answer::Timeout, skipped: true, ..base }.pass());
    }

    #[test]
    fn test_expected_lists_accepted_names() {
        let mut b = [0u8; 64];
        assert_eq!(Case::DataOutsideRam.expected(&mut b), "ioerr|needs_reset");
        assert_eq!(Case::UnknownType.expected(&mut b), "unsupp");
    }
}
