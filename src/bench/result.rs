//! blkbench's JSON result line and the per-job summary.

use hdrhistogram::Histogram;
use serde_json::Value;

use super::Job;
use crate::metrics::{Report, LATENCY_MAX_NS, SIGFIGS};

/// blkbench's exit codes (guests/README.md) as the isa-debug-exit code.
pub const GUEST_OK: u32 = 0;
pub const GUEST_NO_DEVICE: u32 = 2;
pub const GUEST_DEVICE_ERROR: u32 = 3;
pub const GUEST_VERIFY: u32 = 4;
pub const GUEST_BAD_PARAM: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("The guest printed no result line; its last output was: {0}")]
    Missing(String),
    #[error("The guest's result line is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("The guest's result lacks field {0}")]
    Field(&'static str),
    #[error("fio completed no I/O in its {runtime_ms} ms measured window (its slowest submit took {slat_ms} ms): the guest is too slow for this runtime; lengthen --runtime")]
    NoIo { runtime_ms: u64, slat_ms: u64 },
}

/// What the guest measured.
#[derive(Debug, Clone)]
pub struct GuestResult {
    pub raw: Value,
    pub ios: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub seconds: f64,
    pub errors: u64,
    pub verify: String,
    /// p50, p90, p99, p99.9, max (ns).
    pub lat_ns: [u64; 5],
    /// IOPS in each second of the measured run, from blkbench's `progress=1` lines (empty
    /// without them).
    pub iops_per_s: Vec<f64>,
    /// blkbench irq=1: what its interrupt handlers measured.
    pub irq: Option<IrqLatency>,
}

/// blkbench irq=1's `irq` object: the interrupt path, split at the ring-0 handler's TSC
/// stamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IrqLatency {
    /// Interrupts taken in the measured window.
    pub interrupts: u64,
    /// Measured completions announced by no interrupt (found when re-arming).
    pub without_interrupt: u64,
    /// Per request, submit → the handler of the interrupt that announced it: p50, p99 (ns).
    pub handler_ns: [u64; 2],
    /// Per interrupt, the handler's stamp → ring 3 sees it: p50, p99 (ns).
    pub wake_ns: [u64; 2],
}

impl IrqLatency {
    fn parse(irq: &Value) -> Result<IrqLatency, ResultError> {
        let n = |k: &'static str| {
            irq.get(k)
                .and_then(Value::as_u64)
                .ok_or(ResultError::Field(k))
        };
        let pcts = |k: &'static str| -> Result<[u64; 2], ResultError> {
            let h = irq.get(k).ok_or(ResultError::Field(k))?;
            let p = |q: &str| {
                h.get(q)
                    .and_then(Value::as_u64)
                    .ok_or(ResultError::Field(k))
            };
            Ok([p("p50")?, p("p99")?])
        };
        Ok(IrqLatency {
            interrupts: n("interrupts")?,
            without_interrupt: n("without_interrupt")?,
            handler_ns: pcts("handler_ns")?,
            wake_ns: pcts("wake_ns")?,
        })
    }
}

impl GuestResult {
    /// The guest's latency histogram (blkbench's `hist` buckets, ns) as an HdrHistogram with
    /// the host's bounds, or `None` when the result carries no buckets (fio).
    pub fn histogram(&self) -> Option<Histogram<u64>> {
        let buckets = self.raw.get("hist")?.as_array()?;
        let mut h = Histogram::new_with_bounds(1, LATENCY_MAX_NS, SIGFIGS)
            .expect("constant histogram bounds are valid");
        for b in buckets {
            let (v, c) = match b.as_array().map(Vec::as_slice) {
                Some([v, c]) => (v.as_u64()?, c.as_u64()?),
                _ => return None,
            };
            h.saturating_record_n(v.clamp(1, LATENCY_MAX_NS), c);
        }
        Some(h)
    }
}

/// Per-second IOPS from blkbench's `progress: <s>s ios=<n> iops=<n>` lines, whose `ios` is
/// cumulative from the start of the measured window.
pub fn parse_progress(console: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let mut prev = (0u64, 0u64);
    for l in console.lines() {
        let Some(rest) = l.strip_prefix("progress: ") else {
            continue;
        };
        let mut secs = None;
        let mut ios = None;
        for w in rest.split_whitespace() {
            if let Some(s) = w.strip_suffix('s') {
                secs = s.parse::<u64>().ok();
            } else if let Some(n) = w.strip_prefix("ios=") {
                ios = n.parse::<u64>().ok();
            }
        }
        let (Some(s), Some(n)) = (secs, ios) else {
            continue;
        };
        if s <= prev.0 || n < prev.1 {
            continue;
        }
        out.push((n - prev.1) as f64 / (s - prev.0) as f64);
        prev = (s, n);
    }
    out
}

/// Finds and parses the `{"blkbench":1,...}` line in the guest's console output.
pub fn parse_guest(console: &str) -> Result<GuestResult, ResultError> {
    let Some(line) = console
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"blkbench\":"))
    else {
        let tail: Vec<&str> = console
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(ResultError::Missing(if tail.is_empty() {
            "(nothing)".into()
        } else {
            tail.join(" | ")
        }));
    };
    let v: Value = serde_json::from_str(line).map_err(ResultError::Json)?;
    let num = |k: &'static str| {
        v.get(k)
            .and_then(Value::as_f64)
            .ok_or(ResultError::Field(k))
    };
    let lat = v.get("lat_ns").ok_or(ResultError::Field("lat_ns"))?;
    let l = |k: &'static str| {
        lat.get(k)
            .and_then(Value::as_u64)
            .ok_or(ResultError::Field("lat_ns"))
    };
    Ok(GuestResult {
        ios: num("ios")? as u64,
        iops: num("iops")?,
        mib_s: num("mib_s")?,
        seconds: num("seconds")?,
        errors: num("errors")? as u64,
        verify: v
            .get("verify")
            .and_then(Value::as_str)
            .unwrap_or("off")
            .to_string(),
        lat_ns: [l("p50")?, l("p90")?, l("p99")?, l("p99_9")?, l("max")?],
        iops_per_s: parse_progress(console),
        irq: match v.get("irq") {
            Some(i) if !i.is_null() => Some(IrqLatency::parse(i)?),
            _ => None,
        },
        raw: v,
    })
}

/// A finished job: the guest's view and the host's.
pub struct JobResult {
    pub job: Job,
    pub guest: GuestResult,
    pub host: Report,
    /// Process start (or the previous job's end) to the vCPU's first KVM_RUN.
    pub vmm_startup_ns: u64,
}

impl JobResult {
    /// Start to the guest's first I/O: the VMM's start-up plus the guest's own (blkbench's
    /// `platform.first_io_ns`, TSC-timed from its entry point).
    pub fn first_io_ns(&self) -> Option<u64> {
        let guest = self
            .guest
            .raw
            .get("platform")?
            .get("first_io_ns")?
            .as_u64()?;
        Some(self.vmm_startup_ns + guest)
    }

    /// The host's kick→complete and service histograms, all queues merged.
    pub fn host_merged(&self) -> (Histogram<u64>, Histogram<u64>) {
        let mut k2c = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_NS, SIGFIGS)
            .expect("constant histogram bounds are valid");
        let mut svc = k2c.clone();
        for q in &self.host.queues {
            // Same bounds on both sides, so `add` cannot fail.
            let _ = k2c.add(&q.kick_to_complete);
            let _ = svc.add(&q.service);
        }
        (k2c, svc)
    }
}

fn us(ns: u64) -> String {
    let u = ns as f64 / 1000.0;
    if u >= 1000.0 {
        format!("{u:.0}")
    } else {
        format!("{u:.1}")
    }
}

/// The summary table for all jobs. With any irq=1 job, three more columns: the guest's
/// interrupt path split at the ring-0 handler (`-` for polled jobs).
pub fn table(results: &[JobResult]) -> String {
    let irq = results.iter().any(|r| r.guest.irq.is_some());
    let w = results
        .iter()
        .map(|r| r.job.label().chars().count())
        .max()
        .unwrap_or(0)
        .max(22);
    let mut s = format!(
        "{:<w$} {:>9} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7}",
        "job", "IOPS", "MiB/s", "p50", "p90", "p99", "p99.9", "max", "k2c p50", "k2c p99", "k2c p99.9", "svc p50", "svc p99", "ns/req"
    );
    if irq {
        s.push_str(&format!(
            " | {:>8} {:>8} {:>8}",
            "hnd p50", "wake p50", "wake p99"
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "{:<w$} {:>9} {:>8} | {:^44} | {:^26} | {:^17} | {:>7}",
        "", "", "", "guest latency (µs)", "host kick→complete (µs)", "host service (µs)", "VMM CPU"
    ));
    if irq {
        s.push_str(&format!(" | {:^26}", "guest interrupt (µs)"));
    }
    s.push('\n');
    for r in results {
        let (k2c, svc) = r.host_merged();
        // p50, p99, p99.9 of the merged queues.
        let (k, v) = (crate::metrics::pcts(&k2c), crate::metrics::pcts(&svc));
        let (k, v) = ([k[0], k[2], k[3]], [v[0], v[2]]);
        let g = &r.guest.lat_ns;
        s.push_str(&format!(
            "{:<w$} {:>9.0} {:>8.1} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7}",
            r.job.label(),
            r.guest.iops,
            r.guest.mib_s,
            us(g[0]),
            us(g[1]),
            us(g[2]),
            us(g[3]),
            us(g[4]),
            us(k[0]),
            us(k[1]),
            us(k[2]),
            us(v[0]),
            us(v[1]),
            r.host.busy_ns_per_request()
        ));
        match (&r.guest.irq, irq) {
            (Some(i), _) => s.push_str(&format!(
                " | {:>8} {:>8} {:>8}",
                us(i.handler_ns[0]),
                us(i.wake_ns[0]),
                us(i.wake_ns[1])
            )),
            (None, true) => s.push_str(&format!(" | {:>8} {:>8} {:>8}", "-", "-", "-")),
            (None, false) => {}
        }
        s.push('\n');
    }
    s
}

/// The `--json` document: schema in the README ("ringvm bench --json").
pub fn to_json(results: &[JobResult], machine: &Value) -> String {
    let jobs: Vec<Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "job": {
                    "label": r.job.label(),
                    "rw": r.job.rw.as_str(),
                    "bs": r.job.bs,
                    "qd": r.job.qd,
                    "queues": r.job.queues,
                    "runtime_s": r.job.runtime_s,
                    "irq": r.job.irq,
                },
                "startup": {"vmm_ns": r.vmm_startup_ns, "first_io_ns": r.first_io_ns()},
                "guest": r.guest.raw,
                "iops_per_s": r.guest.iops_per_s,
                "host": r.host.to_json_value(),
            })
        })
        .collect();
    serde_json::json!({ "ringvm_bench": 1, "machine": machine, "jobs": jobs }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"blkbench":1,"ios":10,"iops":5.0,"mib_s":0.02,"seconds":2.0,"errors":0,"verify":"ok","lat_ns":{"min":1,"mean":2,"p50":1000,"p90":2000,"p99":3000,"p99_9":4000,"p99_99":5000,"max":6000}}"#;

    #[test]
    fn test_parse_guest_finds_result_among_console_lines() {
        let console = format!("blkbench: starting\n{LINE}\n");
        let g = parse_guest(&console).unwrap();
        assert_eq!((g.ios, g.errors), (10, 0));
        assert_eq!(g.lat_ns, [1000, 2000, 3000, 4000, 6000]);
        assert_eq!(g.verify, "ok");
    }

    #[test]
    fn test_parse_progress_turns_cumulative_counts_into_per_second_iops() {
        let console = "progress: 1s ios=100 iops=100\nnoise\nprogress: 2s ios=250 iops=125\nprogress: 4s ios=450 iops=112\nprogress: garbage\n";
        assert_eq!(parse_progress(console), vec![100.0, 150.0, 100.0]);
        assert!(parse_progress("").is_empty());
    }

    #[test]
    fn test_guest_histogram_from_hist_buckets_keeps_counts() {
        let line = LINE.replace("\"lat_ns\"", "\"hist\":[[1000,3],[52000,7]],\"lat_ns\"");
        let g = parse_guest(&line).unwrap();
        let h = g.histogram().unwrap();
        assert_eq!(h.len(), 10);
        assert_eq!(h.value_at_quantile(0.5), h.highest_equivalent(52000));
        assert!(parse_guest(LINE).unwrap().histogram().is_none());
    }

    const IRQ: &str = r#""irq":{"vector_base":64,"apic_id":0,"interrupts":12,"without_interrupt":2,"handler_ns":{"count":10,"p50":56000,"p99":70000},"wake_ns":{"count":12,"p50":17000,"p99":43000}},"#;

    fn job_result(line: &str, irq: bool) -> JobResult {
        let mut job = Job::default_matrix(1.0).remove(1);
        job.irq = irq;
        JobResult {
            job,
            guest: parse_guest(line).unwrap(),
            host: Report::default(),
            vmm_startup_ns: 0,
        }
    }

    #[test]
    fn test_parse_guest_reads_the_irq_object() {
        let line = LINE.replace("\"lat_ns\"", &format!("{IRQ}\"lat_ns\""));
        let i = parse_guest(&line).unwrap().irq.unwrap();
        assert_eq!((i.interrupts, i.without_interrupt), (12, 2));
        assert_eq!(i.handler_ns, [56000, 70000]);
        assert_eq!(i.wake_ns, [17000, 43000]);
        assert!(parse_guest(LINE).unwrap().irq.is_none());
        let broken = LINE.replace("\"lat_ns\"", "\"irq\":{\"interrupts\":1},\"lat_ns\"");
        let e = parse_guest(&broken).unwrap_err();
        assert!(e.to_string().contains("without_interrupt"), "{e}");
    }

    #[test]
    fn test_table_has_interrupt_columns_only_with_an_irq_job() {
        let polled = job_result(LINE, false);
        let plain = table(std::slice::from_ref(&polled));
        assert!(!plain.contains("hnd p50"), "{plain}");
        assert!(
            plain.lines().all(|l| l.matches('|').count() == 4),
            "{plain}"
        );
        let line = LINE.replace("\"lat_ns\"", &format!("{IRQ}\"lat_ns\""));
        let t = table(&[polled, job_result(&line, true)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("hnd p50") && lines[1].contains("guest interrupt (µs)"),
            "{t}"
        );
        assert!(
            lines[2]
                .trim_end()
                .ends_with("|        -        -        -"),
            "{t}"
        );
        assert!(lines[3].starts_with("4k randread qd32 irq"), "{t}");
        assert!(
            lines[3]
                .trim_end()
                .ends_with("|     56.0     17.0     43.0"),
            "{t}"
        );
    }

    #[test]
    fn test_parse_guest_missing_line_quotes_last_output() {
        let e = parse_guest("blkbench: bad parameter: qd=0\n").unwrap_err();
        assert!(e.to_string().contains("bad parameter: qd=0"), "{e}");
    }

    #[test]
    fn test_parse_guest_missing_field_named() {
        let e = parse_guest(r#"{"blkbench":1,"ios":1}"#).unwrap_err();
        assert!(e.to_string().contains("lacks field"), "{e}");
    }
}
