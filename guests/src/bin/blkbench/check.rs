//! `verify_only=1`: reads a disk this boot did not write and judges every sector's
//! stamp (`ringvm_guests::bench::durable` explains what is checked and why that is
//! sound). Prints one `verify_only:` summary line, the first mismatches, and one JSON
//! line starting with `{"blkbench_verify":1,`.

use super::blkdev::{BlkDev, DATA_BYTES};
use ringvm_guests::bench::chaos::Answer;
use ringvm_guests::bench::durable::{self, Verdict};
use ringvm_guests::bench::params::Params;
use ringvm_guests::bench::stamp::{self, Mismatch};
use ringvm_guests::json::{Buf, Json};
use ringvm_guests::mem::Bump;
use ringvm_guests::tsc::Clock;
use ringvm_guests::virtio::blk::{self, BlkConfig, SECTOR_SIZE};
use ringvm_guests::virtio::pci::VirtioPci;
use ringvm_guests::{print, println, serial};

const TIMEOUT_MS: u64 = 10_000;
const MAX_REPORTED: u64 = 5;

#[derive(Default)]
struct Counts {
    zeros: u64,
    /// Intact stamps of the writer's run.
    run_sectors: u64,
    /// Intact stamps of other runs.
    foreign: u64,
    corrupt: u64,
    lost: u64,
    misplaced: u64,
    newest_gen: u64,
}

/// Returns the exit code: 0 all fine, 3 device error, 4 lost/corrupt/misplaced data.
pub fn run(dev: &VirtioPci, features: u64, cfg: BlkConfig, clock: Clock, p: &Params, bump: &mut Bump) -> u32 {
    let capacity = cfg.capacity_sectors * SECTOR_SIZE;
    let size = p.size.unwrap_or(capacity).min(capacity) / p.bs * p.bs;
    let blocks = size / p.bs;
    if blocks == 0 || p.bs > DATA_BYTES {
        println!("bad parameter: verify_only=1: working set smaller than one block, or bs above 128k");
        return super::EXIT_BAD_PARAM;
    }
    let qsize = dev.queue_max_size(0).min(256);
    let (Some(mut d), Some(table_addr)) = (BlkDev::new(dev, features, qsize, clock, bump), bump.alloc(4 * blocks, 64)) else {
        println!("bad parameter: verify_only=1: the block table does not fit in guest memory");
        return super::EXIT_BAD_PARAM;
    };
    // SAFETY: fresh zeroed memory for `blocks` u32s, owned by this slice from now on.
    let expect = unsafe { core::slice::from_raw_parts_mut(table_addr as *mut u32, blocks as usize) };
    let checked_writes = if p.run != 0 { durable::expected_last(p.seed, p.upto, expect) } else { 0 };
    if d.setup().is_err() {
        println!("device error: setup failed");
        return super::EXIT_DEVICE_ERROR;
    }
    let block_sectors = p.bs / SECTOR_SIZE;
    // Reads of up to DATA_BYTES, whole blocks each.
    let per_read = (DATA_BYTES / p.bs).max(1);
    let mut c = Counts::default();
    let mut b = 0;
    while b < blocks {
        let n = per_read.min(blocks - b);
        let lba = b * block_sectors;
        let a = d.io(blk::T_IN, lba, d.data, (n * p.bs) as u32, TIMEOUT_MS);
        if a != Answer::Status(0) {
            println!("device error: read at lba {} answered {}", lba, a.name());
            return super::EXIT_DEVICE_ERROR;
        }
        for s in 0..n * block_sectors {
            let sector_lba = lba + s;
            let block = sector_lba / block_sectors;
            judge_sector(&mut c, d.data + s * SECTOR_SIZE, sector_lba, block, expect[block as usize], p, blocks);
        }
        b += n;
    }
    let ok = c.lost == 0 && c.corrupt == 0 && c.misplaced == 0;
    println!(
        "verify_only: {} blocks of {} bytes: newest generation {} of run {:#x}, upto {}, checked writes {}, lost {}, corrupt sectors {}, misplaced {}, zeros {}, foreign {}",
        blocks, p.bs, c.newest_gen, p.run, p.upto, checked_writes, c.lost, c.corrupt, c.misplaced, c.zeros, c.foreign
    );
    let mut buf = [0u8; 1024];
    let mut out = Buf::new(&mut buf);
    let mut j = Json::new(&mut out);
    j.begin_object();
    j.u64("blkbench_verify", 1);
    j.u64("blocks", blocks);
    j.u64("bs", p.bs);
    j.u64("seed", p.seed);
    j.u64("run", p.run);
    j.u64("upto", p.upto);
    j.u64("newest_gen", c.newest_gen);
    j.u64("checked_writes", checked_writes);
    j.u64("lost", c.lost);
    j.u64("corrupt", c.corrupt);
    j.u64("misplaced", c.misplaced);
    j.u64("run_sectors", c.run_sectors);
    j.u64("zeros", c.zeros);
    j.u64("foreign", c.foreign);
    j.bool("ok", ok);
    j.end_object();
    serial::write_bytes(out.as_bytes());
    serial::write_bytes(b"\n");
    if ok {
        super::EXIT_OK
    } else {
        super::EXIT_VERIFY
    }
}

/// Sectors are judged one by one; `lost` and friends count sectors.
fn judge_sector(c: &mut Counts, at: u64, lba: u64, block: u64, expect: u32, p: &Params, blocks: u64) {
    let found = match stamp::inspect(at, lba) {
        Ok(f) => f,
        Err(why) => {
            if c.corrupt + c.lost + c.misplaced < MAX_REPORTED {
                print!("verify mismatch: lba {}: ", lba);
                match why {
                    Mismatch::BadMagic => println!("no stamp (bad magic)"),
                    Mismatch::BadChecksum => println!("stamp checksum wrong"),
                    Mismatch::WrongLba(l) => println!("stamp is for lba {}", l),
                    _ => println!("unexpected"),
                }
            }
            c.corrupt += 1;
            return;
        }
    };
    match found {
        None => c.zeros += 1,
        Some((r, g)) if r == p.run => {
            c.run_sectors += 1;
            c.newest_gen = c.newest_gen.max(g);
        }
        Some(_) => c.foreign += 1,
    }
    if p.run == 0 {
        return;
    }
    let v = durable::judge(found, block, expect, p.seed, p.run, blocks);
    if v != Verdict::Fine {
        if c.corrupt + c.lost + c.misplaced < MAX_REPORTED {
            let (r, g) = found.unwrap_or((0, 0));
            println!(
                "verify mismatch: lba {} (block {}): {} run {:#x} generation {}, expected generation >= {}",
                lba, block, if v == Verdict::Lost { "lost write:" } else { "misplaced:" }, r, g, expect
            );
        }
        if v == Verdict::Lost {
            c.lost += 1;
        } else {
            c.misplaced += 1;
        }
    }
}
