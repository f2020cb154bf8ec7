//! The I/O engine: per-queue request slots with fixed descriptor chains, batched
//! submission gated by EVENT_IDX, completions found by polling the used rings in guest
//! RAM or (irq=1) after each queue's interrupt, per-request TSC latency, verify
//! bookkeeping and the watchdog.

use ringvm_guests::bench::params::{Params, Rw};
use ringvm_guests::bench::durable;
use ringvm_guests::bench::stamp::{self, Expect, Mismatch};
use ringvm_guests::arch::{mmio, rdtsc};
use ringvm_guests::hist::Histogram;
use ringvm_guests::irq;
use ringvm_guests::mem::Bump;
use ringvm_guests::{print, println};
use ringvm_guests::rng::Rng;
use ringvm_guests::tsc::Clock;
use ringvm_guests::virtio::blk::{self, HEADER_SIZE, SECTOR_SIZE};
use ringvm_guests::virtio::queue::{write_desc_at, SplitQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};

/// No completion for this long with requests in flight: the device is stuck.
pub const WATCHDOG_NS: u64 = 10_000_000_000;
/// Mismatch and error details printed before going quiet.
const MAX_REPORTED: u64 = 5;

const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_FLUSH: u8 = 2;

/// Per-block verify table: bit 31 = request in flight, low bits = generation
/// of the last completed write in this run (0 = none, UNKNOWN = failed write).
const BUSY: u32 = 1 << 31;
const UNKNOWN: u32 = BUSY - 1;

/// One request slot: header, status byte, data buffer and a 3-descriptor
/// chain that never changes except for the data direction and flushes.
#[derive(Clone, Copy)]
struct Slot {
    /// Header at +0, status byte at +16.
    meta: u64,
    data: u64,
    /// First of the slot's three descriptors (in the ring, or its indirect table).
    chain: u64,
    /// Index of `chain` for `next` fields (3*slot in the ring, 0 in a table).
    chain_idx: u16,
    submit_tsc: u64,
    block: u64,
    /// Writes: the generation written. Flushes with durable=1: the watermark (every
    /// generation up to it had completed when the flush was submitted).
    gen: u32,
    op: u8,
    /// Submitted and not yet seen in the used ring.
    in_flight: bool,
}

/// A queue with its slots.
pub struct QueueState {
    q: SplitQueue,
    slots: &'static mut [Slot],
    free: &'static mut [u16],
    nfree: usize,
    /// irq=1: the handler's interrupt count as last seen.
    irq_seen: u64,
    /// Ring head → slot: head / 3 for direct chains, head for indirect.
    head_shift_div3: bool,
}

/// Totals over the measured window.
#[derive(Default)]
pub struct Stats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub verify_errors: u64,
    pub verify_sectors: u64,
    pub kicks: u64,
    /// irq=1: interrupts taken in the measured window (ring 3 saw their count move after
    /// the ramp, stamped after it), over all queues.
    pub interrupts: u64,
    /// irq=1: measured completions no interrupt announced: found by the check after
    /// re-arming a queue's interrupt (published before the re-arm took effect), or seen
    /// after an interrupt older than their submission.
    pub without_interrupt: u64,
    /// Measured window, TSC.
    pub start_tsc: u64,
    pub end_tsc: u64,
}

/// Why a run stopped early.
pub enum RunError {
    Timeout,
}

/// Everything the run loop needs.
/// The histograms a run records into.
pub struct Hists<'h> {
    /// Per request: submit → ring 3 sees the completion (both modes).
    pub lat: &'h mut Histogram,
    /// irq=1, per request: submit → the ring-0 handler of the interrupt that announced it.
    pub irq_handler: &'h mut Histogram,
    /// irq=1, per interrupt: the handler's TSC stamp → ring 3 sees the flag.
    pub irq_wake: &'h mut Histogram,
}

pub struct Engine<'h> {
    p: Params,
    clock: Clock,
    queues: &'static mut [QueueState],
    blocks: u64,
    /// 512-byte sectors per block.
    block_sectors: u64,
    table: Option<&'static mut [u32]>,
    rng: Rng,
    cursor: u64,
    next_gen: u32,
    run_id: u64,
    writes_since_flush: u64,
    /// durable=1: flushes completed (the sequence number printed).
    flushes_done: u64,
    hists: Hists<'h>,
    pub stats: Stats,
    pub indirect: bool,
    pub verify_table: bool,
}

/// How requests are laid out.
pub struct Layout {
    /// Each slot uses an indirect table (qd*3 exceeds the queue size).
    pub indirect: bool,
    /// Working-set bytes (a multiple of bs).
    pub size_bytes: u64,
}

/// Splits `n` zeroed `T`s off the bump allocator.
fn alloc_slice<T>(bump: &mut Bump, n: usize) -> Option<&'static mut [T]> {
    let bytes = (core::mem::size_of::<T>() * n.max(1)) as u64;
    let addr = bump.alloc(bytes, 64)?;
    // SAFETY: fresh, zeroed, suitably aligned memory owned from now on by the
    // slice; T is plain data for which all-zero bytes are a valid value.
    Some(unsafe { core::slice::from_raw_parts_mut(addr as *mut T, n) })
}

impl<'h> Engine<'h> {
    /// Builds slots and descriptor chains for already-enabled queues.
    /// Returns `None` if guest memory runs out.
    pub fn new(
        p: Params,
        clock: Clock,
        rings: &mut [Option<SplitQueue>],
        layout: Layout,
        bump: &mut Bump,
        hists: Hists<'h>,
    ) -> Option<Self> {
        let Layout { indirect: use_indirect, size_bytes } = layout;
        let nqueues = rings.iter().filter(|r| r.is_some()).count();
        let queues_ptr = bump.alloc((core::mem::size_of::<QueueState>() * nqueues) as u64, 64)? as *mut QueueState;
        let qd = p.qd as usize;
        for (i, q) in rings.iter_mut().filter_map(|r| r.take()).enumerate() {
            let slots = alloc_slice::<Slot>(bump, qd)?;
            let free = alloc_slice::<u16>(bump, qd)?;
            let meta = bump.alloc(32 * qd as u64, 64)?;
            let tables = if use_indirect { bump.alloc(3 * DESC_SIZE * qd as u64, 64)? } else { 0 };
            for s in 0..qd {
                let data = bump.alloc(p.bs, 4096)?;
                let (chain, chain_idx) = if use_indirect {
                    (tables + 3 * DESC_SIZE * s as u64, 0u16)
                } else {
                    (q.desc + 3 * DESC_SIZE * s as u64, 3 * s as u16)
                };
                let m = meta + 32 * s as u64;
                write_desc_at(chain, m, HEADER_SIZE, DESC_F_NEXT, chain_idx + 1);
                write_desc_at(chain + DESC_SIZE, data, p.bs as u32, DESC_F_NEXT | DESC_F_WRITE, chain_idx + 2);
                write_desc_at(chain + 2 * DESC_SIZE, m + 16, 1, DESC_F_WRITE, 0);
                if use_indirect {
                    q.write_desc(s as u16, chain, 3 * DESC_SIZE as u32, DESC_F_INDIRECT, 0);
                }
                slots[s] = Slot {
                    meta: m,
                    data,
                    chain,
                    chain_idx,
                    submit_tsc: 0,
                    block: 0,
                    gen: 0,
                    op: OP_READ,
                    in_flight: false,
                };
                free[s] = s as u16;
                if !p.verify && p.rw.writes() {
                    // Non-zero payload so backends cannot shortcut zero writes.
                    stamp::fill(data, p.bs, 0, p.seed, 0);
                }
            }
            // SAFETY: queues_ptr has room for nqueues states; slot i written once.
            unsafe {
                queues_ptr.add(i).write(QueueState { q, slots, free, nfree: qd, irq_seen: 0, head_shift_div3: !use_indirect })
            };
        }
        // SAFETY: all nqueues entries were initialised above.
        let queues = unsafe { core::slice::from_raw_parts_mut(queues_ptr, nqueues) };
        let blocks = size_bytes / p.bs;
        // Exact per-block generations when the table fits in a quarter of what is left.
        let table = if p.verify && blocks * 4 <= bump.remaining() / 4 { alloc_slice::<u32>(bump, blocks as usize) } else { None };
        let verify_table = table.is_some();
        Some(Engine {
            p,
            clock,
            queues,
            blocks,
            block_sectors: p.bs / SECTOR_SIZE,
            table,
            rng: Rng::new(p.seed),
            cursor: 0,
            next_gen: 1,
            run_id: rdtsc() | 1,
            writes_since_flush: 0,
            flushes_done: 0,
            hists,
            stats: Stats::default(),
            indirect: use_indirect,
            verify_table,
        })
    }

    /// Picks a block no other request is using (with a verify table), or `None`.
    fn pick_block(&mut self) -> Option<u64> {
        if self.p.durable {
            // The block is a function of the generation; a busy block makes the write wait.
            let b = durable::block_of(self.p.seed, u64::from(self.next_gen), self.blocks);
            return match &self.table {
                Some(t) if t[b as usize] & BUSY != 0 => None,
                _ => Some(b),
            };
        }
        for _ in 0..8 {
            let b = if self.p.rw.random() {
                self.rng.below(self.blocks)
            } else {
                let b = self.cursor;
                self.cursor = if b + 1 == self.blocks { 0 } else { b + 1 };
                b
            };
            match &self.table {
                Some(t) if t[b as usize] & BUSY != 0 => continue,
                _ => return Some(b),
            }
        }
        None
    }

    /// Fills free slots of queue `qi` and publishes them. Returns requests added.
    fn submit(&mut self, qi: usize, now: u64, budget: &mut u64) -> u32 {
        let mut added = 0;
        while self.queues[qi].nfree > 0 && *budget > 0 {
            let flush = self.p.flush_every != 0 && self.writes_since_flush >= self.p.flush_every;
            let (op, block) = if flush {
                self.writes_since_flush = 0;
                (OP_FLUSH, 0)
            } else {
                let Some(b) = self.pick_block() else { break };
                let read = match self.p.rw {
                    Rw::RandRead | Rw::Read => true,
                    Rw::RandWrite | Rw::Write => false,
                    Rw::RandRw => self.rng.below(100) < self.p.rwmix,
                };
                (if read { OP_READ } else { OP_WRITE }, b)
            };
            let mut gen = 0;
            if op == OP_FLUSH && self.p.durable {
                gen = self.watermark();
            }
            if op != OP_FLUSH {
                *budget -= 1;
                if let Some(t) = &mut self.table {
                    t[block as usize] |= BUSY;
                }
            }
            let st = &mut self.queues[qi];
            st.nfree -= 1;
            let s = st.free[st.nfree] as usize;
            let slot = &mut st.slots[s];
            let lba = block * self.block_sectors;
            let (kind, data_flags, next) = match op {
                OP_READ => (blk::T_IN, DESC_F_NEXT | DESC_F_WRITE, 1),
                OP_WRITE => (blk::T_OUT, DESC_F_NEXT, 1),
                _ => (blk::T_FLUSH, DESC_F_NEXT, 2),
            };
            if op == OP_WRITE {
                self.writes_since_flush += 1;
                if self.p.verify {
                    gen = self.next_gen;
                    self.next_gen = if gen + 1 >= UNKNOWN { 1 } else { gen + 1 };
                    stamp::fill(slot.data, self.p.bs, lba, self.run_id, u64::from(gen));
                }
            }
            blk::write_header(slot.meta, kind, if op == OP_FLUSH { 0 } else { lba });
            mmio::write8(slot.meta + 16, 0xff);
            mmio::write16(slot.chain + 14, slot.chain_idx + next);
            mmio::write16(slot.chain + DESC_SIZE + 12, data_flags);
            slot.op = op;
            slot.block = block;
            slot.gen = gen;
            slot.submit_tsc = now;
            slot.in_flight = true;
            let head = if st.head_shift_div3 { 3 * s as u16 } else { s as u16 };
            st.q.push(head);
            added += 1;
        }
        self.queues[qi].q.publish();
        added
    }

    /// Consumes completions on queue `qi`. Returns how many. `handler_tsc`: the TSC of
    /// the interrupt that announced them (irq=1).
    fn poll(&mut self, qi: usize, measure_from: u64, recording: bool, handler_tsc: Option<u64>) -> u32 {
        let mut n = 0;
        let mut now = 0;
        while let Some((id, _len)) = self.queues[qi].q.pop_used() {
            if n == 0 {
                now = rdtsc();
            }
            n += 1;
            let st = &mut self.queues[qi];
            let s = if st.head_shift_div3 { id as usize / 3 } else { id as usize };
            if s >= st.slots.len() || !st.slots[s].in_flight {
                println!("device error: used id {} is not a request in flight", id);
                self.stats.errors += 1;
                continue;
            }
            st.slots[s].in_flight = false;
            let slot = st.slots[s];
            st.free[st.nfree] = s as u16;
            st.nfree += 1;
            let status = mmio::read8(slot.meta + 16);
            let measured = recording && slot.submit_tsc >= measure_from;
            if slot.op == OP_FLUSH && self.p.durable && status == blk::S_OK {
                // The host may kill the VMM at any moment: this line is the promise it checks.
                self.flushes_done += 1;
                println!("durable: flushed {} gen {}", self.flushes_done, slot.gen);
            }
            if status != blk::S_OK {
                if self.stats.errors < MAX_REPORTED {
                    let op = ["read", "write", "flush"][usize::from(slot.op)];
                    println!("device error: status {} for {} at lba {}", status, op, slot.block * self.block_sectors);
                }
                self.stats.errors += 1;
            }
            if slot.op != OP_FLUSH {
                if let Some(t) = &mut self.table {
                    let e = &mut t[slot.block as usize];
                    *e &= !BUSY;
                    if slot.op == OP_WRITE && self.p.verify {
                        *e = if status == blk::S_OK { slot.gen } else { UNKNOWN };
                    }
                }
            }
            if slot.op == OP_READ && self.p.verify && status == blk::S_OK {
                self.verify_read(&slot);
            }
            if measured {
                match slot.op {
                    OP_READ => self.stats.reads += 1,
                    OP_WRITE => self.stats.writes += 1,
                    _ => self.stats.flushes += 1,
                }
                if slot.op != OP_FLUSH {
                    self.stats.bytes += self.p.bs;
                    self.hists.lat.record(self.clock.cycles_to_ns(now.wrapping_sub(slot.submit_tsc)));
                    match handler_tsc {
                        Some(h) if h >= slot.submit_tsc => {
                            self.hists.irq_handler.record(self.clock.cycles_to_ns(h - slot.submit_tsc))
                        }
                        // Found when re-arming, or completed so fast that the latest
                        // interrupt predates its submission: no interrupt announced it.
                        _ if self.p.irq => self.stats.without_interrupt += 1,
                        _ => {}
                    }
                }
                self.stats.end_tsc = now;
            }
        }
        if n > 0 {
            self.queues[qi].q.suppress_interrupts();
        }
        n
    }

    fn verify_read(&mut self, slot: &Slot) {
        let expect = match &self.table {
            Some(t) => match t[slot.block as usize] & !BUSY {
                0 => Expect::NotThisRun,
                UNKNOWN => Expect::Any,
                g => Expect::Gen(u64::from(g)),
            },
            None => Expect::Any,
        };
        let lba = slot.block * self.block_sectors;
        self.stats.verify_sectors += self.block_sectors;
        if let Err((bad_lba, why)) = stamp::check(slot.data, self.p.bs, lba, self.run_id, expect) {
            if self.stats.verify_errors < MAX_REPORTED {
                print!("verify mismatch: lba {} (request at lba {}): ", bad_lba, lba);
                match why {
                    Mismatch::BadMagic => print!("no stamp (bad magic)"),
                    Mismatch::BadChecksum => print!("stamp checksum wrong"),
                    Mismatch::WrongLba(l) => print!("stamp is for lba {}", l),
                    Mismatch::WrongRun(r) => print!("stamp from run {:#x}, this run is {:#x}", r, self.run_id),
                    Mismatch::WrongGen(g) => print!("generation {} (0 = zeros)", g),
                }
                match expect {
                    Expect::Gen(g) => println!("; expected generation {} of this run", g),
                    Expect::NotThisRun => println!("; expected zeros or an earlier run's stamp"),
                    Expect::Any => println!(),
                }
            }
            self.stats.verify_errors += 1;
        }
    }

    /// The largest generation G such that every write 1..=G has completed: one below the
    /// oldest write in flight, or the last one issued.
    fn watermark(&self) -> u32 {
        let oldest = self
            .queues
            .iter()
            .flat_map(|q| q.slots.iter())
            .filter(|s| s.in_flight && s.op == OP_WRITE)
            .map(|s| s.gen)
            .min();
        oldest.unwrap_or(self.next_gen) - 1
    }

    /// irq=1: consumes queue `qi`'s completions if its handler has run since the last
    /// look (the used ring is not read before), then re-arms the interrupt and consumes
    /// whatever was published before the re-arm took effect. Returns completions.
    fn poll_irq(&mut self, qi: usize, measure_from: u64, recording: bool) -> u32 {
        let (count, handler_tsc) = irq::cell(qi);
        if count == self.queues[qi].irq_seen {
            return 0;
        }
        let seen = rdtsc();
        if recording && handler_tsc >= measure_from {
            self.stats.interrupts += count - self.queues[qi].irq_seen;
            if seen >= handler_tsc {
                self.hists.irq_wake.record(self.clock.cycles_to_ns(seen - handler_tsc));
            }
        }
        self.queues[qi].irq_seen = count;
        let mut n = self.poll(qi, measure_from, recording, Some(handler_tsc));
        while self.queues[qi].q.arm_interrupt() {
            n += self.poll(qi, measure_from, recording, None);
        }
        n
    }

    /// Arms every queue's interrupt before the first submission (irq=1).
    fn arm_all(&mut self) {
        for st in self.queues.iter_mut() {
            st.irq_seen = irq::cell(usize::from(st.q.index)).0;
            st.q.arm_interrupt();
        }
    }

    /// Used entries waiting with no interrupt taken for them, over all queues (after a
    /// watchdog timeout: an interrupt that never came).
    pub fn completions_waiting(&self) -> u64 {
        self.queues.iter().map(|st| u64::from(st.q.used_pending())).sum()
    }

    pub fn hists(&self) -> &Hists<'h> {
        &self.hists
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.slots.len() - q.nfree).sum()
    }

    /// Runs ramp + measured window (+ drain). Records into the histogram.
    pub fn run(&mut self) -> Result<(), RunError> {
        let c = self.clock;
        let start = rdtsc();
        let measure_from = start + c.ns_to_cycles(self.p.ramp_ns);
        let deadline = self.p.runtime_ns.map(|ns| measure_from + c.ns_to_cycles(ns));
        let watchdog = c.ns_to_cycles(WATCHDOG_NS);
        let second = c.ns_to_cycles(1_000_000_000);
        let mut measured_budget = self.p.ios.unwrap_or(u64::MAX);
        let mut ramp_budget = u64::MAX;
        let mut recording = self.p.ramp_ns == 0;
        self.stats.start_tsc = measure_from;
        self.stats.end_tsc = measure_from;
        let mut last_progress = start;
        let mut next_report = measure_from + second;
        let mut stopping = false;
        if self.p.irq {
            self.arm_all();
        }
        if self.p.durable {
            // Before the first write, so a host that kills the VMM early knows the run.
            println!("durable: run {:#x} seed {} blocks {} bs {}", self.run_id, self.p.seed, self.blocks, self.p.bs);
        }
        loop {
            let now = rdtsc();
            if !recording && now >= measure_from {
                recording = true;
            }
            if deadline.is_some_and(|d| now >= d) || measured_budget == 0 {
                stopping = true;
            }
            let mut progress = 0;
            for qi in 0..self.queues.len() {
                if !stopping {
                    let budget = if recording { &mut measured_budget } else { &mut ramp_budget };
                    self.submit(qi, now, budget);
                }
                progress += if self.p.irq {
                    self.poll_irq(qi, measure_from, recording)
                } else {
                    self.poll(qi, measure_from, recording, None)
                };
            }
            if progress > 0 {
                last_progress = now;
            } else if self.p.irq && self.in_flight() > 0 && now.wrapping_sub(last_progress) <= watchdog {
                core::hint::spin_loop();
            } else if self.in_flight() == 0 {
                if stopping {
                    break;
                }
                last_progress = now;
            } else if now.wrapping_sub(last_progress) > watchdog {
                return Err(RunError::Timeout);
            }
            if self.p.progress && recording && now >= next_report {
                next_report += second;
                let ios = self.stats.reads + self.stats.writes;
                let secs = c.cycles_to_ns(now - measure_from) / 1_000_000_000;
                println!("progress: {}s ios={} iops={}", secs, ios, ios / secs.max(1));
            }
        }
        self.stats.kicks = self.queues.iter().map(|q| q.q.kicks).sum();
        Ok(())
    }
}
