//! blkbench command-line parameters: parsing and the checks that need no device.

use crate::cmdline;

/// Workload pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    RandRead,
    RandWrite,
    Read,
    Write,
    RandRw,
}

impl Rw {
    pub fn name(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRw => "randrw",
        }
    }
    pub fn random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite | Rw::RandRw)
    }
    pub fn writes(self) -> bool {
        !matches!(self, Rw::RandRead | Rw::Read)
    }
}

/// Validated parameters.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub rw: Rw,
    /// Read percentage for randrw.
    pub rwmix: u64,
    pub bs: u64,
    pub qd: u32,
    pub queues: u16,
    /// Measured run time; `None` with `ios` given alone.
    pub runtime_ns: Option<u64>,
    pub ios: Option<u64>,
    pub ramp_ns: u64,
    /// Working-set bytes; `None` = whole disk.
    pub size: Option<u64>,
    pub seed: u64,
    pub verify: bool,
    pub flush_every: u64,
    pub tsc_khz: Option<u64>,
    pub qsize: Option<u16>,
    pub progress: bool,
    /// Run the hostile-driver cases instead of a benchmark.
    pub chaos: bool,
    /// Writer side of the durability test: deterministic block per generation, a
    /// `durable: flushed` console line after each completed flush.
    pub durable: bool,
    /// Checker side: read the whole working set and judge the stamps.
    pub verify_only: bool,
    /// verify_only: the writer's run id (its `durable: run` line); 0 = report only.
    pub run: u64,
    /// verify_only: the newest flushed generation the writer reported.
    pub upto: u64,
    /// Move the device's 64-bit BARs here (above 4 GiB, 1 GiB aligned) before using them.
    pub bar64: Option<u64>,
    /// Wait for each queue's MSI-X interrupt instead of polling the used rings.
    pub irq: bool,
}

pub const DEFAULT_RUNTIME_NS: u64 = 5_000_000_000;
/// Largest block size accepted (one descriptor per buffer).
pub const MAX_BS: u64 = 64 << 20;

/// A parameter that cannot be used, with the reason.
#[derive(Debug)]
pub struct ParamError<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub reason: &'static str,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            rw: Rw::RandRead,
            rwmix: 50,
            bs: 4096,
            qd: 1,
            queues: 1,
            runtime_ns: Some(DEFAULT_RUNTIME_NS),
            ios: None,
            ramp_ns: 0,
            size: None,
            seed: 1,
            verify: false,
            flush_every: 0,
            tsc_khz: None,
            qsize: None,
            progress: false,
            chaos: false,
            durable: false,
            verify_only: false,
            run: 0,
            upto: 0,
            bar64: None,
            irq: false,
        }
    }
}

impl Params {
    /// Parses `key=value` words; unknown keys and malformed values are errors.
    pub fn parse(cmd: &str) -> Result<Params, ParamError<'_>> {
        let mut p = Params::default();
        let mut runtime = None;
        for (key, value) in cmdline::pairs(cmd) {
            let bad = |reason| ParamError { key, value, reason };
            let num = || cmdline::parse_u64(value).ok_or(bad("not a number"));
            let boolean = || match value {
                "1" | "on" | "yes" | "true" => Ok(true),
                "0" | "off" | "no" | "false" => Ok(false),
                _ => Err(bad("expected 0 or 1")),
            };
            match key {
                "rw" => {
                    p.rw = match value {
                        "randread" => Rw::RandRead,
                        "randwrite" => Rw::RandWrite,
                        "read" => Rw::Read,
                        "write" => Rw::Write,
                        "randrw" => Rw::RandRw,
                        _ => return Err(bad("expected randread, randwrite, read, write or randrw")),
                    }
                }
                "rwmix" => {
                    p.rwmix = num()?;
                    if p.rwmix > 100 {
                        return Err(bad("read percentage above 100"));
                    }
                }
                "bs" => {
                    p.bs = cmdline::parse_size(value).ok_or(bad("not a size"))?;
                    if p.bs == 0 || p.bs % 512 != 0 {
                        return Err(bad("must be a non-zero multiple of 512"));
                    }
                    if p.bs > MAX_BS {
                        return Err(bad("larger than 64 MiB"));
                    }
                }
                "qd" => {
                    let qd = num()?;
                    if qd == 0 || qd > 32768 {
                        return Err(bad("must be 1..32768"));
                    }
                    p.qd = qd as u32;
                }
                "queues" => {
                    let n = num()?;
                    if n == 0 || n > 1024 {
                        return Err(bad("must be 1..1024"));
                    }
                    p.queues = n as u16;
                }
                "runtime" => {
                    let ns = cmdline::parse_duration_ns(value).ok_or(bad("not a duration"))?;
                    if ns == 0 {
                        return Err(bad("must be positive"));
                    }
                    runtime = Some(ns);
                }
                "ios" => {
                    let n = num()?;
                    if n == 0 {
                        return Err(bad("must be positive"));
                    }
                    p.ios = Some(n);
                }
                "ramp" => p.ramp_ns = cmdline::parse_duration_ns(value).ok_or(bad("not a duration"))?,
                "size" => {
                    let s = cmdline::parse_size(value).ok_or(bad("not a size"))?;
                    if s == 0 {
                        return Err(bad("must be positive"));
                    }
                    p.size = Some(s);
                }
                "seed" => p.seed = num()?,
                "verify" => p.verify = boolean()?,
                "flush_every" => p.flush_every = num()?,
                "tsc_khz" => {
                    let khz = num()?;
                    if !(1000..=100_000_000).contains(&khz) {
                        return Err(bad("must be 1000..100000000"));
                    }
                    p.tsc_khz = Some(khz);
                }
                "qsize" => {
                    let n = num()?;
                    if n == 0 || n > 32768 || !n.is_power_of_two() {
                        return Err(bad("must be a power of two, 1..32768"));
                    }
                    p.qsize = Some(n as u16);
                }
                "progress" => p.progress = boolean()?,
                "irq" => p.irq = boolean()?,
                "chaos" => p.chaos = boolean()?,
                "durable" => p.durable = boolean()?,
                "verify_only" => p.verify_only = boolean()?,
                "run" => p.run = num()?,
                "upto" => {
                    p.upto = num()?;
                    if p.upto >= 1 << 31 {
                        return Err(bad("must be below 2^31"));
                    }
                }
                "bar64" => {
                    let at = cmdline::parse_size(value).ok_or(bad("not an address"))?;
                    if at < 1 << 32 || at % (1 << 30) != 0 || at >= 1 << 47 {
                        return Err(bad("must be a multiple of 1 GiB from 4 GiB up to 2^47"));
                    }
                    p.bar64 = Some(at);
                }
                _ => return Err(ParamError { key, value, reason: "unknown parameter" }),
            }
        }
        if p.durable && !(p.verify && p.rw == Rw::RandWrite && p.flush_every > 0) {
            let value = cmdline::get(cmd, "durable").unwrap_or("");
            return Err(ParamError { key: "durable", value, reason: "needs rw=randwrite verify=1 flush_every=N" });
        }
        if p.chaos && p.verify_only {
            let value = cmdline::get(cmd, "chaos").unwrap_or("");
            return Err(ParamError { key: "chaos", value, reason: "chaos=1 and verify_only=1 exclude each other" });
        }
        if p.irq && (p.chaos || p.verify_only) {
            let value = cmdline::get(cmd, "irq").unwrap_or("");
            return Err(ParamError { key: "irq", value, reason: "irq=1 drives the benchmark, not chaos=1 or verify_only=1" });
        }
        // Run time and I/O count: either bounds the run; neither means 5 s.
        p.runtime_ns = match (runtime, p.ios) {
            (Some(ns), _) => Some(ns),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_RUNTIME_NS),
        };
        Ok(p)
    }

    /// Read percentage actually used by the workload.
    pub fn read_percent(&self) -> u64 {
        match self.rw {
            Rw::RandRead | Rw::Read => 100,
            Rw::RandWrite | Rw::Write => 0,
            Rw::RandRw => self.rwmix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_empty_cmdline_gives_defaults() {
        let p = Params::parse("").unwrap();
        assert_eq!(p.rw, Rw::RandRead);
        assert_eq!((p.bs, p.qd, p.queues), (4096, 1, 1));
        assert_eq!(p.runtime_ns, Some(DEFAULT_RUNTIME_NS));
        assert_eq!(p.ios, None);
        assert!(!p.verify);
    }

    #[test]
    fn test_parse_full_cmdline_reads_every_key() {
        let p = Params::parse(
            "rw=randrw rwmix=70 bs=128k qd=32 queues=2 runtime=250ms ramp=1 size=1g seed=7 verify=1 flush_every=8 tsc_khz=2000000 qsize=512 progress=1 irq=1",
        )
        .unwrap();
        assert_eq!(p.rw, Rw::RandRw);
        assert_eq!(p.read_percent(), 70);
        assert_eq!((p.bs, p.qd, p.queues), (128 << 10, 32, 2));
        assert_eq!(p.runtime_ns, Some(250_000_000));
        assert_eq!(p.ramp_ns, 1_000_000_000);
        assert_eq!(p.size, Some(1 << 30));
        assert_eq!((p.seed, p.verify, p.flush_every), (7, true, 8));
        assert_eq!((p.tsc_khz, p.qsize, p.progress), (Some(2_000_000), Some(512), true));
        assert!(p.irq);
    }

    #[test]
    fn test_parse_irq_with_a_mode_that_is_no_benchmark_is_rejected() {
        assert!(!Params::parse("").unwrap().irq);
        assert!(!Params::parse("irq=0").unwrap().irq);
        for cmd in ["irq=1 chaos=1", "irq=1 verify_only=1"] {
            assert_eq!(Params::parse(cmd).unwrap_err().key, "irq", "{cmd}");
        }
        assert_eq!(Params::parse("irq=2").unwrap_err().key, "irq");
    }

    #[test]
    fn test_parse_bar64_takes_a_high_gib_aligned_address() {
        assert_eq!(Params::parse("bar64=256g").unwrap().bar64, Some(256 << 30));
        assert_eq!(Params::parse("bar64=0x1000000000").unwrap().bar64, Some(64 << 30));
        for bad in ["bar64=1g", "bar64=0x148000000", "bar64=256t", "bar64=x"] {
            let e = Params::parse(bad).unwrap_err();
            assert_eq!(e.key, "bar64", "{bad}");
        }
    }

    #[test]
    fn test_parse_durable_needs_a_flushing_verified_randwrite() {
        let p = Params::parse("rw=randwrite verify=1 flush_every=16 durable=1").unwrap();
        assert!(p.durable);
        for cmd in ["durable=1", "rw=randwrite verify=1 durable=1", "rw=write verify=1 flush_every=4 durable=1"] {
            assert_eq!(Params::parse(cmd).unwrap_err().key, "durable", "{cmd}");
        }
        let p = Params::parse("verify_only=1 run=0x1f upto=12 seed=3").unwrap();
        assert_eq!((p.verify_only, p.run, p.upto, p.seed), (true, 0x1f, 12, 3));
        assert_eq!(Params::parse("chaos=1 verify_only=1").unwrap_err().key, "chaos");
        assert_eq!(Params::parse("upto=0x80000000").unwrap_err().key, "upto");
    }

    #[test]
    fn test_parse_ios_alone_has_no_time_limit() {
        let p = Params::parse("ios=1000").unwrap();
        assert_eq!((p.ios, p.runtime_ns), (Some(1000), None));
        let p = Params::parse("ios=1000 runtime=2").unwrap();
        assert_eq!((p.ios, p.runtime_ns), (Some(1000), Some(2_000_000_000)));
    }

    #[test]
    fn test_parse_bad_values_name_the_parameter() {
        for (cmd, key) in [
            ("bs=3", "bs"),
            ("bs=0", "bs"),
            ("bs=4kb", "bs"),
            ("qd=0", "qd"),
            ("qd=x", "qd"),
            ("queues=0", "queues"),
            ("rw=trim", "rw"),
            ("rwmix=101", "rwmix"),
            ("runtime=0", "runtime"),
            ("runtime=abc", "runtime"),
            ("ios=0", "ios"),
            ("size=0", "size"),
            ("verify=2", "verify"),
            ("qsize=1000", "qsize"),
            ("tsc_khz=5", "tsc_khz"),
            ("bs=4k foo=1", "foo"),
            ("nokey", "nokey"),
        ] {
            let e = Params::parse(cmd).unwrap_err();
            assert_eq!(e.key, key, "{cmd}");
        }
    }
}
