//! `chaos=1`: a hostile driver. Each case sets the device up from scratch, sends one
//! malformed request (or does one forbidden thing), judges the answer
//! (`ringvm_guests::bench::chaos`), checks that the device still serves a normal
//! write+read without a reset (unless it asked for one), then resets it, sets it up
//! again and checks normal I/O once more. One line per case, then one JSON line
//! starting with `{"blkbench_chaos":1,`.

use super::blkdev::BlkDev;
use ringvm_guests::arch::{mmio, rdtsc};
use ringvm_guests::bench::chaos::{Answer, Case, Outcome, CASES};
use ringvm_guests::bench::stamp::{self, Expect};
use ringvm_guests::json::{Buf, Json};
use ringvm_guests::mem::Bump;
use ringvm_guests::tsc::Clock;
use ringvm_guests::virtio::blk::{self, BlkConfig, HEADER_SIZE};
use ringvm_guests::virtio::pci::VirtioPci;
use ringvm_guests::virtio::queue::{write_desc_at, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};
use ringvm_guests::virtio as virtio;
use ringvm_guests::{println, serial};

/// A request's answer must come within this (the devices answer in microseconds).
const TIMEOUT_MS: u64 = 2000;
/// First descriptor of a hostile chain (0..3 are the normal request's).
const H: u16 = 8;
/// Far outside any guest RAM (and inside no MMIO window): 1 PiB.
const FAR: u64 = 1 << 50;
/// Largest queue used, so a chain longer than the queue fits in the buffers.
const MAX_QSIZE: u16 = 64;
/// Where the probe writes (block 1 at 4 KiB).
const PROBE_LBA: u64 = 8;
const IO_BYTES: u32 = 4096;
/// Data descriptors of indirect_too_long at most (the table area holds 2048 entries).
const MAX_TOO_LONG: u16 = 2000;

// virtio-pci common configuration offsets, for the forbidden writes.
const QUEUE_SELECT: u64 = 22;
const QUEUE_SIZE: u64 = 24;
const QUEUE_ENABLE: u64 = 28;
const QUEUE_DESC: u64 = 32;

static mut JSON_BUF: [u8; 8192] = [0; 8192];

/// Runs every case; returns the exit code (0: all passed, 3: some failed).
pub fn run(dev: &VirtioPci, features: u64, cfg: BlkConfig, clock: Clock, bump: &mut Bump) -> u32 {
    let qsize = dev.queue_max_size(0).min(MAX_QSIZE);
    if qsize < 16 || !qsize.is_power_of_two() {
        println!("device error: queue 0 size {} (chaos needs a power of two >= 16)", qsize);
        return super::EXIT_DEVICE_ERROR;
    }
    let Some(mut d) = BlkDev::new(dev, features, qsize, clock, bump) else {
        println!("bad parameter: chaos=1: buffers do not fit in guest memory");
        return super::EXIT_BAD_PARAM;
    };
    let ro = features & blk::F_RO != 0;
    let mut probe = Probe { run: rdtsc() | 1, gen: 0, ro };
    let mut outcomes = [None; CASES.len()];
    for (i, &case) in CASES.iter().enumerate() {
        let o = run_one(&mut d, case, &cfg, &mut probe);
        let mut exp = [0u8; 64];
        println!(
            "chaos: {} expected {} observed {} served_after {} recovered {} {}",
            case.name(),
            case.expected(&mut exp),
            if o.skipped { "skipped" } else { o.observed.name() },
            match o.served_after {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            },
            if o.recovered { "yes" } else { "NO" },
            if o.pass() { "PASS" } else { "FAIL" }
        );
        outcomes[i] = Some(o);
    }
    report(&outcomes, ro, qsize, cfg, features)
}

struct Probe {
    run: u64,
    gen: u64,
    ro: bool,
}

impl Probe {
    /// A normal write, read back and checked (a read on a read-only disk).
    fn io_works(&mut self, d: &mut BlkDev) -> bool {
        if self.ro {
            return d.io(blk::T_IN, PROBE_LBA, d.data2, IO_BYTES, TIMEOUT_MS) == Answer::Status(0);
        }
        self.gen += 1;
        stamp::fill(d.data, u64::from(IO_BYTES), PROBE_LBA, self.run, self.gen);
        if d.io(blk::T_OUT, PROBE_LBA, d.data, IO_BYTES, TIMEOUT_MS) != Answer::Status(0) {
            return false;
        }
        if d.io(blk::T_IN, PROBE_LBA, d.data2, IO_BYTES, TIMEOUT_MS) != Answer::Status(0) {
            return false;
        }
        stamp::check(d.data2, u64::from(IO_BYTES), PROBE_LBA, self.run, Expect::Gen(self.gen)).is_ok()
    }
}

fn run_one(d: &mut BlkDev, case: Case, cfg: &BlkConfig, probe: &mut Probe) -> Outcome {
    let mut o = Outcome { case, observed: Answer::SetupFailed, served_after: None, recovered: false, skipped: false };
    let skip = (case == Case::WriteReadOnly && !probe.ro)
        || (matches!(case, Case::IndirectNested | Case::IndirectBadLen | Case::IndirectTooLong)
            && d.features & virtio::F_INDIRECT_DESC == 0);
    if skip {
        o.skipped = true;
        o.recovered = true;
        return o;
    }
    if d.setup().is_err() {
        return o;
    }
    o.observed = if case == Case::QueueChangeAfterDriverOk {
        queue_change(d, probe)
    } else {
        send(d, case, cfg)
    };
    if matches!(o.observed, Answer::Status(_) | Answer::NoStatus(_)) {
        o.served_after = Some(probe.io_works(d));
    }
    o.recovered = d.setup().is_ok() && probe.io_works(d);
    o
}

/// Builds the case's chain on descriptors H.. (and the indirect tables), submits it and
/// waits for the answer.
fn send(d: &mut BlkDev, case: Case, cfg: &BlkConfig) -> Answer {
    let capacity = cfg.capacity_sectors;
    let seg_max = cfg.seg_max.min(u32::from(MAX_TOO_LONG)) as u16;
    let (meta, data, st) = (d.meta, d.data, d.status_addr());
    let read = DESC_F_NEXT | DESC_F_WRITE;
    // The default chain: header, a 4 KiB read buffer, status.
    let (mut kind, mut sector) = (blk::T_IN, 0u64);
    let mut data_desc = (data, IO_BYTES, read);
    let mut status_desc = (st, 1u32, DESC_F_WRITE);
    match case {
        Case::DataOutsideRam => data_desc.0 = FAR,
        Case::StatusOutsideRam => status_desc.0 = FAR,
        Case::ZeroLenData => data_desc.1 = 0,
        Case::StatusReadOnly => status_desc.2 = 0,
        Case::UnknownType => kind = 0xff,
        Case::WriteReadOnly => {
            kind = blk::T_OUT;
            data_desc.2 = DESC_F_NEXT;
        }
        Case::BeyondCapacity => sector = capacity,
        Case::StraddleEnd => sector = capacity.saturating_sub(4),
        Case::SectorOverflow => sector = u64::MAX - 3,
        Case::DescLoop => {
            d.header(kind, 0);
            d.desc(H, meta, HEADER_SIZE, DESC_F_NEXT, H + 1);
            d.desc(H + 1, data, IO_BYTES, read, H);
            return d.submit(H, TIMEOUT_MS);
        }
        Case::IndirectNested | Case::IndirectBadLen | Case::IndirectTooLong => {
            d.header(kind, 0);
            return indirect(d, case, seg_max);
        }
        Case::AvailJump => {
            // A valid chain behind an index that claims qsize + 3 new entries.
            d.header(kind, 0);
            d.desc(H, meta, HEADER_SIZE, DESC_F_NEXT, H + 1);
            d.desc(H + 1, data, IO_BYTES, read, H + 2);
            d.desc(H + 2, st, 1, DESC_F_WRITE, 0);
            let idx = d.q.published().wrapping_add(d.q.size).wrapping_add(3);
            d.q.write_avail_idx_raw(idx);
            d.q.kick();
            return d.wait(TIMEOUT_MS);
        }
        Case::QueueChangeAfterDriverOk => unreachable!("handled by queue_change"),
    }
    d.header(kind, sector);
    d.desc(H, meta, HEADER_SIZE, DESC_F_NEXT, H + 1);
    d.desc(H + 1, data_desc.0, data_desc.1, data_desc.2, H + 2);
    d.desc(H + 2, status_desc.0, status_desc.1, status_desc.2, 0);
    d.submit(H, TIMEOUT_MS)
}

/// The indirect-table cases; the header is already written.
fn indirect(d: &mut BlkDev, case: Case, seg_max: u16) -> Answer {
    let (meta, data, st) = (d.meta, d.data, d.status_addr());
    let read = DESC_F_NEXT | DESC_F_WRITE;
    let valid_table = |t: u64| {
        write_desc_at(t, meta, HEADER_SIZE, DESC_F_NEXT, 1);
        write_desc_at(t + DESC_SIZE, data, IO_BYTES, read, 2);
        write_desc_at(t + 2 * DESC_SIZE, st, 1, DESC_F_WRITE, 0);
    };
    match case {
        Case::IndirectNested => {
            let (outer, inner) = (d.table(0), d.table(1));
            valid_table(inner);
            write_desc_at(outer, inner, 3 * DESC_SIZE as u32, DESC_F_INDIRECT, 0);
            d.desc(H, outer, DESC_SIZE as u32, DESC_F_INDIRECT, 0);
        }
        Case::IndirectBadLen => {
            let t = d.table(0);
            valid_table(t);
            d.desc(H, t, 3 * DESC_SIZE as u32 - 8, DESC_F_INDIRECT, 0);
        }
        _ => {
            // Header, max(qsize, seg_max) + 2 one-sector buffers (all the same sector of
            // RAM), status: longer than the queue and than seg_max.
            let t = d.table(0);
            let n = (d.q.size.max(seg_max) + 2).min(MAX_TOO_LONG);
            write_desc_at(t, meta, HEADER_SIZE, DESC_F_NEXT, 1);
            for i in 1..=n {
                write_desc_at(t + DESC_SIZE * u64::from(i), data, 512, read, i + 1);
            }
            write_desc_at(t + DESC_SIZE * u64::from(n + 1), st, 1, DESC_F_WRITE, 0);
            d.desc(H, t, u32::from(n + 2) * DESC_SIZE as u32, DESC_F_INDIRECT, 0);
        }
    }
    d.submit(H, TIMEOUT_MS)
}

/// Queue 0's size, descriptor table and enable written after DRIVER_OK, then normal I/O:
/// `Status(0)` when it worked (the writes were ignored), else what went wrong.
fn queue_change(d: &mut BlkDev, probe: &mut Probe) -> Answer {
    let c = d.dev.common;
    mmio::write16(c + QUEUE_SELECT, 0);
    mmio::write16(c + QUEUE_SIZE, d.q.size / 2);
    mmio::write64_split(c + QUEUE_DESC, d.tables);
    mmio::write16(c + QUEUE_ENABLE, 0);
    if d.needs_reset() {
        return Answer::NeedsReset;
    }
    if probe.io_works(d) {
        return Answer::Status(0);
    }
    if d.needs_reset() {
        Answer::NeedsReset
    } else {
        Answer::Timeout
    }
}

fn report(outcomes: &[Option<Outcome>], ro: bool, qsize: u16, cfg: BlkConfig, features: u64) -> u32 {
    // SAFETY: the report is built once, on the only thread.
    let buf = unsafe { &mut *(&raw mut JSON_BUF) };
    let mut out = Buf::new(buf);
    let mut j = Json::new(&mut out);
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    j.begin_object();
    j.u64("blkbench_chaos", 1);
    j.bool("readonly", ro);
    j.u64("qsize", u64::from(qsize));
    j.u64("capacity_sectors", cfg.capacity_sectors);
    j.u64("features", features);
    j.begin_array_field("cases");
    for o in outcomes.iter().flatten() {
        let mut exp = [0u8; 64];
        j.begin_object_item();
        j.str("case", o.case.name());
        j.str("expected", o.case.expected(&mut exp));
        j.str("observed", if o.skipped { "skipped" } else { o.observed.name() });
        if let Answer::NoStatus(len) = o.observed {
            j.u64("used_len", u64::from(len));
        }
        match o.served_after {
            Some(v) => j.bool("served_after", v),
            None => j.null("served_after"),
        }
        j.bool("recovered", o.recovered);
        j.bool("pass", o.pass());
        j.end_object();
        match (o.skipped, o.pass()) {
            (true, _) => skipped += 1,
            (false, true) => passed += 1,
            (false, false) => failed += 1,
        }
    }
    j.end_array();
    j.u64("passed", passed);
    j.u64("failed", failed);
    j.u64("skipped", skipped);
    j.end_object();
    println!("chaos: {} passed, {} failed, {} skipped", passed, failed, skipped);
    serial::write_bytes(out.as_bytes());
    serial::write_bytes(b"\n");
    if failed == 0 {
        super::EXIT_OK
    } else {
        super::EXIT_DEVICE_ERROR
    }
}
