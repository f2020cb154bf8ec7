//! The Prometheus text exposition (format 0.0.4) of a [`Report`], written by hand.
//!
//! Per queue (labels `device`, `queue`, `reactor`): counters of requests, bytes, kicks,
//! interrupts sent and suppressed, poll hits and errors, and the kick-to-completion and
//! service latencies as Prometheus histograms in seconds. Per reactor (labels `reactor`,
//! `core`): busy and idle seconds, passes and `io_uring_enter` calls.
//!
//! Histogram buckets come from the reactors' HdrHistograms (3 significant digits): a
//! sample counts in the bucket `le` when its HdrHistogram bucket's highest equivalent value
//! is at most `le`, so a bucket bound can be off by 0.1 % of its value. `_sum` adds each
//! sample at its HdrHistogram bucket's middle value (HdrHistogram keeps no exact sum), the
//! same way its `mean()` does. One pass over each histogram's recorded buckets does both.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::metrics::{QueueCounters, QueueMetrics, Report};

/// Upper bounds of the latency histogram buckets, ns (then `+Inf`): 1-2-5 steps from 1 µs
/// to 1 s, which covers a RAM disk at QD1 up to a saturated spinning disk.
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
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

fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn queue_labels(q: &QueueMetrics) -> String {
    format!(
        "device=\"{}\",queue=\"{}\",reactor=\"{}\"",
        escape(&q.device),
        q.queue,
        q.reactor
    )
}

fn seconds(ns: u64) -> String {
    format!("{}", ns as f64 / 1e9)
}

/// Cumulative counts of `h` at each bound of [`LATENCY_BUCKETS_NS`], and the sum of its
/// samples in ns (each at its bucket's middle value), in one pass over the recorded buckets.
fn cumulative(h: &Histogram<u64>) -> ([u64; LATENCY_BUCKETS_NS.len()], f64) {
    let mut per = [0u64; LATENCY_BUCKETS_NS.len() + 1];
    let mut sum = 0.0;
    for v in h.iter_recorded() {
        let top = h.highest_equivalent(v.value_iterated_to());
        let n = v.count_at_value();
        per[LATENCY_BUCKETS_NS.partition_point(|&b| b < top)] += n;
        sum += h.median_equivalent(top) as f64 * n as f64;
    }
    let mut out = [0u64; LATENCY_BUCKETS_NS.len()];
    let mut acc = 0;
    for (o, p) in out.iter_mut().zip(per) {
        acc += p;
        *o = acc;
    }
    (out, sum)
}

fn histogram(
    s: &mut String,
    name: &str,
    help: &str,
    report: &Report,
    pick: fn(&QueueMetrics) -> &Histogram<u64>,
) {
    let _ = writeln!(s, "# HELP ringvm_queue_{name}_seconds {help}");
    let _ = writeln!(s, "# TYPE ringvm_queue_{name}_seconds histogram");
    for q in &report.queues {
        let h = pick(q);
        let l = queue_labels(q);
        let (counts, sum_ns) = cumulative(h);
        for (bound, count) in LATENCY_BUCKETS_NS.iter().zip(counts) {
            let _ = writeln!(
                s,
                "ringvm_queue_{name}_seconds_bucket{{{l},le=\"{}\"}} {count}",
                seconds(*bound)
            );
        }
        let n = h.len();
        let sum = sum_ns / 1e9;
        let _ = writeln!(
            s,
            "ringvm_queue_{name}_seconds_bucket{{{l},le=\"+Inf\"}} {n}"
        );
        let _ = writeln!(s, "ringvm_queue_{name}_seconds_sum{{{l}}} {sum}");
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
    for (name, help, get) in QUEUE_COUNTERS {
        let _ = writeln!(s, "# HELP ringvm_queue_{name}_total {help}");
        let _ = writeln!(s, "# TYPE ringvm_queue_{name}_total counter");
        for q in &report.queues {
            let _ = writeln!(
                s,
                "ringvm_queue_{name}_total{{{}}} {}",
                queue_labels(q),
                get(&q.counters)
            );
        }
    }
    histogram(
        &mut s,
        "kick_to_complete",
        "Kick seen by the reactor (or pop, for polled requests) to used-ring publish.",
        report,
        |q| &q.kick_to_complete,
    );
    histogram(
        &mut s,
        "service",
        "Pop from the avail ring to completion.",
        report,
        |q| &q.service,
    );
    type ReactorCounter = (
        &'static str,
        &'static str,
        fn(&crate::metrics::ReactorMetrics) -> String,
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
        ("passes", "Event-loop passes.", |r| r.passes.to_string()),
        ("enters", "io_uring_enter calls.", |r| r.enters.to_string()),
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
    use crate::metrics::ReactorMetrics;

    fn report() -> Report {
        let mut q = QueueMetrics::new("disk\"1", 0, 1);
        for us in [1u64, 3, 3, 40, 900, 5_000_000] {
            q.record_k2c(Duration::from_micros(us));
            q.record_service(Duration::from_micros(us));
        }
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
