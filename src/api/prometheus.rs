//! The Prometheus text exposition (format 0.0.4) of a [`Report`], written by hand.
//!
//! Per queue (labels `device`, `queue`, `reactor`): counters of requests, bytes, kicks,
//! interrupts sent and suppressed, poll hits and errors, and the kick-to-completion and
//! service latencies as Prometheus histograms in seconds. Per reactor (labels `reactor`,
//! `core`): busy and idle seconds, passes and `io_uring_enter` calls.
//!
//! Histogram buckets come from the reactors' HdrHistograms (3 significant digits): a
//! sample counts in the bucket `le` when its HdrHistogram bucket's highest equivalent value
//! is at most `le`, so a bucket bound can be off by 0.1 % of its value. The cumulative
//! report keeps these bucket counts as it merges each interval ([`crate::metrics::Buckets`]),
//! so a scrape costs the same after an hour as after a second. `_sum` is exact: the
//! reactors add each sample to a counter as they record it.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::metrics::{Buckets, QueueCounters, QueueMetrics, Report, LATENCY_BUCKETS_NS};

/// The `le` label of each bound of [`LATENCY_BUCKETS_NS`] (seconds, as `{}` prints the
/// bound / 1e9; a test checks each against that).
const LE: [&str; LATENCY_BUCKETS_NS.len()] = [
    "0.000001", "0.000002", "0.000005", "0.00001", "0.00002", "0.00005", "0.0001", "0.0002",
    "0.0005", "0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1",
];

type Counter = (&'static str, &'static str, fn(&QueueCounters) -> u64);

const QUEUE_COUNTERS: [Counter; 11] = [
    (
        "requests",
        "Requests completed (all types, failed ones included).",
        |c| c.requests(),
    ),
    ("reads", "Read requests completed.", |c| c.reads),
    ("writes", "Write requests completed.", |c| c.writes),
    ("flushes", "Flush requests completed.", |c| c.flushes),
    ("read_bytes", "Bytes read for the guest.", |c| c.bytes_read),
    ("written_bytes", "Bytes written for the guest.", |c| {
        c.bytes_written
    }),
    ("kicks", "Kick eventfd wake-ups seen by the reactor.", |c| {
        c.kicks
    }),
    ("irqs_sent", "Interrupts written to the irqfd.", |c| {
        c.irqs_sent
    }),
    (
        "irqs_suppressed",
        "Batches after which EVENT_IDX (or a missing vector) suppressed the interrupt.",
        |c| c.irqs_suppressed,
    ),
    (
        "poll_hits",
        "Busy-poll passes that found new requests without a kick.",
        |c| c.poll_hits,
    ),
    (
        "errors",
        "Requests completed with IOERR or without a status byte.",
        |c| c.errors,
    ),
];

/// Writes `v` escaped as a label value.
fn escape_into(s: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
}

/// The label set of `q` (written once per queue and reused for each of its lines).
fn queue_labels(q: &QueueMetrics) -> String {
    let mut s = String::with_capacity(48 + q.device.len());
    s.push_str("device=\"");
    escape_into(&mut s, &q.device);
    let _ = write!(s, "\",queue=\"{}\",reactor=\"{}\"", q.queue, q.reactor);
    s
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One latency histogram family. Bucket counts come from the fixed buckets the cumulative
/// report keeps (so a scrape does not walk the 25,600 counters of each histogram), or from
/// the histogram itself where those do not count every sample (a report not built by
/// merging intervals); `_sum` is the exact sum the reactor counts.
fn histogram(
    s: &mut String,
    name: &str,
    help: &str,
    queues: &[(String, &QueueMetrics)],
    pick: fn(&QueueMetrics) -> (&Histogram<u64>, &Buckets, u64),
) {
    let _ = writeln!(s, "# HELP ringvm_queue_{name}_seconds {help}");
    let _ = writeln!(s, "# TYPE ringvm_queue_{name}_seconds histogram");
    for (l, q) in queues {
        let (h, kept, sum_ns) = pick(q);
        let n = h.len();
        let counts = if kept.total() == n {
            kept.cumulative()
        } else {
            Buckets::of(h).cumulative()
        };
        for (le, count) in LE.iter().zip(counts) {
            let _ = writeln!(
                s,
                "ringvm_queue_{name}_seconds_bucket{{{l},le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            s,
            "ringvm_queue_{name}_seconds_bucket{{{l},le=\"+Inf\"}} {n}"
        );
        let _ = writeln!(
            s,
            "ringvm_queue_{name}_seconds_sum{{{l}}} {}",
            seconds(sum_ns)
        );
        let _ = writeln!(s, "ringvm_queue_{name}_seconds_count{{{l}}} {n}");
    }
}

/// The exposition of `report` (`uptime`: the VM's, for `ringvm_uptime_seconds`).
pub fn exposition(report: &Report, uptime_s: f64) -> String {
    let mut s = String::with_capacity(4096 + report.queues.len() * 6144);
    let _ = writeln!(
        s,
        "# HELP ringvm_uptime_seconds Time since the VM's reactors started."
    );
    let _ = writeln!(s, "# TYPE ringvm_uptime_seconds gauge");
    let _ = writeln!(s, "ringvm_uptime_seconds {uptime_s}");
    let queues: Vec<(String, &QueueMetrics)> =
        report.queues.iter().map(|q| (queue_labels(q), q)).collect();
    for (name, help, get) in QUEUE_COUNTERS {
        let _ = writeln!(s, "# HELP ringvm_queue_{name}_total {help}");
        let _ = writeln!(s, "# TYPE ringvm_queue_{name}_total counter");
        for (l, q) in &queues {
            let _ = writeln!(s, "ringvm_queue_{name}_total{{{l}}} {}", get(&q.counters));
        }
    }
    histogram(
        &mut s,
        "kick_to_complete",
        "Kick seen by the reactor (or pop, for polled requests) to used-ring publish.",
        &queues,
        |q| (&q.kick_to_complete, &q.k2c_buckets, q.counters.k2c_sum_ns),
    );
    histogram(
        &mut s,
        "service",
        "Pop from the avail ring to completion.",
        &queues,
        |q| (&q.service, &q.service_buckets, q.counters.service_sum_ns),
    );
    type ReactorCounter = (
        &'static str,
        &'static str,
        fn(&crate::metrics::ReactorMetrics) -> f64,
    );
    let reactor: [ReactorCounter; 4] = [
        (
            "busy_seconds",
            "Time outside the blocking wait for work.",
            |r| seconds(r.busy_ns),
        ),
        (
            "idle_seconds",
            "Time blocked in io_uring_enter waiting for work.",
            |r| seconds(r.idle_ns),
        ),
        ("passes", "Event-loop passes.", |r| r.passes as f64),
        ("enters", "io_uring_enter calls.", |r| r.enters as f64),
    ];
    for (name, help, get) in reactor {
        let _ = writeln!(s, "# HELP ringvm_reactor_{name}_total {help}");
        let _ = writeln!(s, "# TYPE ringvm_reactor_{name}_total counter");
        for r in &report.reactors {
            let _ = writeln!(
                s,
                "ringvm_reactor_{name}_total{{reactor=\"{}\",core=\"{}\"}} {}",
                r.index,
                r.core,
                get(r)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::{QueueRecorder, ReactorMetrics};

    fn report() -> Report {
        let mut rec = QueueRecorder::new("disk\"1", 0, 1);
        for us in [1u64, 3, 3, 40, 900, 5_000_000] {
            rec.record_k2c(Duration::from_micros(us));
            rec.record_service(Duration::from_micros(us));
        }
        // The histograms alone, without kept buckets (as a report read back from JSON).
        let mut q = QueueMetrics::new("disk\"1", 0, 1);
        q.kick_to_complete = rec.kick_to_complete.to_histogram();
        q.service = rec.service.to_histogram();
        q.counters = rec.counters;
        q.counters.reads = 6;
        q.counters.poll_hits = 2;
        Report {
            reactors: vec![ReactorMetrics {
                index: 1,
                core: 3,
                busy_ns: 1_500_000_000,
                ..Default::default()
            }],
            queues: vec![q],
            elapsed: Duration::from_secs(2),
        }
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn test_le_labels_print_each_bound_in_seconds() {
        for (le, ns) in LE.iter().zip(LATENCY_BUCKETS_NS) {
            assert_eq!(*le, format!("{}", ns as f64 / 1e9));
        }
    }

    #[test]
    fn test_exposition_uses_kept_buckets_and_falls_back_to_the_histogram() {
        // Built by merging (as the API's cumulative report is): the kept buckets count.
        let mut merged = Report {
            reactors: report().reactors,
            ..Default::default()
        };
        merged.add_queue(&report().queues[0]);
        merged.add_queue(&report().queues[0]);
        let q = &merged.queues[0];
        assert_eq!(q.service_buckets.total(), 12);
        let (a, b) = (exposition(&merged, 1.0), {
            // The same samples recorded directly: the histogram is walked instead.
            let mut direct = report();
            let once = direct.queues[0].clone();
            direct.queues[0].merge(&once);
            exposition(&direct, 1.0)
        });
        assert_eq!(a, b);
        let l = "device=\"disk\\\"1\",queue=\"0\",reactor=\"1\"";
        assert_eq!(
            value(
                &a,
                &format!("ringvm_queue_kick_to_complete_seconds_bucket{{{l},le=\"0.000005\"}}")
            ),
            6.0
        );
    }

    #[test]
    fn test_exposition_counters_carry_escaped_labels() {
        let t = exposition(&report(), 2.0);
        let l = "device=\"disk\\\"1\",queue=\"0\",reactor=\"1\"";
        assert_eq!(
            value(&t, &format!("ringvm_queue_requests_total{{{l}}}")),
            6.0
        );
        assert_eq!(
            value(&t, &format!("ringvm_queue_poll_hits_total{{{l}}}")),
            2.0
        );
        assert_eq!(
            value(
                &t,
                "ringvm_reactor_busy_seconds_total{reactor=\"1\",core=\"3\"}"
            ),
            1.5
        );
    }

    #[test]
    fn test_exposition_histogram_buckets_are_cumulative_and_end_at_count() {
        let t = exposition(&report(), 2.0);
        let l = "device=\"disk\\\"1\",queue=\"0\",reactor=\"1\"";
        let b = |le: &str| {
            value(
                &t,
                &format!("ringvm_queue_service_seconds_bucket{{{l},le=\"{le}\"}}"),
            )
        };
        assert_eq!(b("0.000001"), 1.0);
        assert_eq!(b("0.000005"), 3.0);
        assert_eq!(b("0.001"), 5.0);
        assert_eq!(b("1"), 5.0, "5 s is above the last bound");
        assert_eq!(b("+Inf"), 6.0);
        assert_eq!(
            value(&t, &format!("ringvm_queue_service_seconds_count{{{l}}}")),
            6.0
        );
        let sum = value(&t, &format!("ringvm_queue_service_seconds_sum{{{l}}}"));
        assert!((sum - 5.000947).abs() < 0.01, "{sum}");
    }

    #[test]
    fn test_exposition_every_family_has_help_and_type_once() {
        let t = exposition(&report(), 2.0);
        let mut types: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let n = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), n, "a family is declared twice");
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(types.contains(&family) || types.contains(&name), "{l}");
        }
    }
}
