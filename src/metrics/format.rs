//! Report formats: text table, JSON, HdrHistogram V2 interval log.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{QueueCounters, QueueMetrics, ReactorMetrics, Report};

const PERCENTILES: [f64; 4] = [50.0, 90.0, 99.0, 99.9];

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// p50, p90, p99, p99.9 and max of `h` (zeros when empty).
pub fn pcts(h: &Histogram<u64>) -> [u64; 5] {
    if h.is_empty() {
        return [0; 5];
    }
    [
        h.value_at_percentile(PERCENTILES[0]),
        h.value_at_percentile(PERCENTILES[1]),
        h.value_at_percentile(PERCENTILES[2]),
        h.value_at_percentile(PERCENTILES[3]),
        h.max(),
    ]
}

/// A histogram in the JSON report: summary and full distribution. `buckets` lists
/// `[value, count]` for every recorded value bucket (HdrHistogram's equivalent values,
/// 3 significant digits).
#[derive(Serialize)]
struct HistJson {
    count: u64,
    min: u64,
    /// Rounded to 0.1 ns, as the report has always printed it.
    mean: f64,
    p50: u64,
    p90: u64,
    p99: u64,
    p99_9: u64,
    max: u64,
    buckets: Vec<(u64, u64)>,
}

impl HistJson {
    fn new(h: &Histogram<u64>) -> Self {
        let p = pcts(h);
        HistJson {
            count: h.len(),
            min: if h.is_empty() { 0 } else { h.min() },
            mean: if h.is_empty() {
                0.0
            } else {
                (h.mean() * 10.0).round() / 10.0
            },
            p50: p[0],
            p90: p[1],
            p99: p[2],
            p99_9: p[3],
            max: p[4],
            buckets: h
                .iter_recorded()
                .map(|v| {
                    (
                        h.highest_equivalent(v.value_iterated_to()),
                        v.count_at_value(),
                    )
                })
                .collect(),
        }
    }
}

/// One queue in the JSON report: its identity, `requests`, then every counter.
#[derive(Serialize)]
struct QueueJson<'a> {
    device: &'a str,
    queue: u16,
    reactor: usize,
    requests: u64,
    #[serde(flatten)]
    counters: &'a QueueCounters,
    kick_to_complete_ns: HistJson,
    service_ns: HistJson,
    batch: HistJson,
}

/// The JSON report (latencies in ns); field order is the document's.
#[derive(Serialize)]
struct ReportJson<'a> {
    elapsed_ns: u128,
    busy_ns_per_request: u64,
    queues: Vec<QueueJson<'a>>,
    reactors: &'a [ReactorMetrics],
}

fn tag_of(q: &QueueMetrics, what: &str) -> String {
    // Interval-log tags may not contain spaces or commas.
    let dev: String = q
        .device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{dev}-q{}-{what}", q.queue)
}

/// Errors from writing an interval log.
#[derive(Debug, thiserror::Error)]
pub enum HlogError {
    #[error("Failed to write the histogram log {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to encode a histogram for {path}: {message}")]
    Encode { path: String, message: String },
}

impl Report {
    /// A text table: one row per queue with counters and kick-to-completion percentiles (µs),
    /// then one row per reactor with busy/idle time.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:>3} {:>3} {:>10} {:>10} {:>10} {:>6} {:>8} {:>8} {:>8} | {:>9} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>6}",
            "device", "q", "r", "requests", "MiB rd", "MiB wr", "errs", "kicks", "irqs", "irq-supp",
            "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "svc p50", "svc p99", "batch"
        );
        for q in &self.queues {
            let c = &q.counters;
            let p = pcts(&q.kick_to_complete);
            let sp = pcts(&q.service);
            let _ = writeln!(
                s,
                "{:<12} {:>3} {:>3} {:>10} {:>10.1} {:>10.1} {:>6} {:>8} {:>8} {:>8} | {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} | {:>9.1} {:>9.1} {:>6.1}",
                q.device,
                q.queue,
                q.reactor,
                c.requests(),
                c.bytes_read as f64 / (1 << 20) as f64,
                c.bytes_written as f64 / (1 << 20) as f64,
                c.errors,
                c.kicks,
                c.irqs_sent,
                c.irqs_suppressed,
                us(p[0]),
                us(p[1]),
                us(p[2]),
                us(p[3]),
                us(p[4]),
                us(sp[0]),
                us(sp[2]),
                if q.batch.is_empty() { 0.0 } else { q.batch.mean() },
            );
        }
        let _ = writeln!(
            s,
            "{:<10} {:>5} {:>12} {:>12} {:>7} {:>12} {:>10}",
            "reactor", "core", "busy ms", "idle ms", "busy %", "passes", "enters"
        );
        for r in &self.reactors {
            let total = r.busy_ns + r.idle_ns;
            let pct = if total == 0 {
                0.0
            } else {
                100.0 * r.busy_ns as f64 / total as f64
            };
            let _ = writeln!(
                s,
                "reactor{:<3} {:>5} {:>12.1} {:>12.1} {:>7.1} {:>12} {:>10}",
                r.index,
                r.core,
                r.busy_ns as f64 / 1e6,
                r.idle_ns as f64 / 1e6,
                pct,
                r.passes,
                r.enters
            );
        }
        let _ = writeln!(s, "busy ns/request: {}", self.busy_ns_per_request());
        s
    }

    /// The report as one JSON object (latencies in ns).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.json_doc()).expect("the report holds only strings and numbers")
    }

    /// [`Report::to_json`] as a value, to embed in a larger document (`ringvm bench --json`).
    pub fn to_json_value(&self) -> serde_json::Value {
        serde_json::to_value(self.json_doc()).expect("the report holds only strings and numbers")
    }

    fn json_doc(&self) -> ReportJson<'_> {
        ReportJson {
            elapsed_ns: self.elapsed.as_nanos(),
            busy_ns_per_request: self.busy_ns_per_request(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueJson {
                    device: &q.device,
                    queue: q.queue,
                    reactor: q.reactor,
                    requests: q.counters.requests(),
                    counters: &q.counters,
                    kick_to_complete_ns: HistJson::new(&q.kick_to_complete),
                    service_ns: HistJson::new(&q.service),
                    batch: HistJson::new(&q.batch),
                })
                .collect(),
            reactors: &self.reactors,
        }
    }

    /// Writes every histogram as one tagged interval of an HdrHistogram V2 interval log at `path`
    /// (created or truncated). The interval spans the report's elapsed time.
    pub fn write_hlog(&self, path: &Path) -> Result<(), HlogError> {
        self.write_hlog_with(path, &[])
    }

    /// [`Report::write_hlog`] plus `extra` histograms, each one interval under its own tag
    /// (the guest's latency histogram as `guest`, so guest and host plot together).
    pub fn write_hlog_with(
        &self,
        path: &Path,
        extra: &[(&str, &Histogram<u64>)],
    ) -> Result<(), HlogError> {
        let p = path.display().to_string();
        let io = |source| HlogError::Io {
            path: p.clone(),
            source,
        };
        let mut buf = Vec::new();
        self.write_hlog_to(&mut buf, extra)
            .map_err(|message| HlogError::Encode {
                path: p.clone(),
                message,
            })?;
        let mut f = std::fs::File::create(path).map_err(io)?;
        f.write_all(&buf).map_err(io)
    }

    /// Writes the interval log into `out`: the queues' histograms, then `extra`.
    pub fn write_hlog_to(
        &self,
        out: &mut Vec<u8>,
        extra: &[(&str, &Histogram<u64>)],
    ) -> Result<(), String> {
        let mut ser = V2Serializer::new();
        let now = SystemTime::now();
        let start = now.checked_sub(self.elapsed).unwrap_or(now);
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment("ringvm block metrics: latencies in ns, batch sizes in requests")
            .with_start_time(start)
            .with_base_time(start)
            .begin_log_with(out, &mut ser)
            .map_err(|e| e.to_string())?;
        let dur = if self.elapsed.is_zero() {
            Duration::from_millis(1)
        } else {
            self.elapsed
        };
        for q in &self.queues {
            for (what, h) in [
                ("k2c", &q.kick_to_complete),
                ("svc", &q.service),
                ("batch", &q.batch),
            ] {
                let tag = tag_of(q, what);
                w.write_histogram(h, Duration::ZERO, dur, Tag::new(&tag))
                    .map_err(|e| e.to_string())?;
            }
        }
        for (tag, h) in extra {
            let tag = Tag::new(tag).ok_or_else(|| format!("invalid interval-log tag {tag:?}"))?;
            w.write_histogram(h, Duration::ZERO, dur, Some(tag))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Appends one interval per snapshot to an interval log: each interval holds what was
/// recorded since the previous snapshot (for `--hlog` with periodic or SIGUSR1 snapshots).
pub struct HlogWriter {
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    prev: Option<Report>,
}

impl HlogWriter {
    /// Creates (or truncates) the log at `path`; `started` is when the pool started.
    pub fn create(path: &Path, started: SystemTime) -> Result<HlogWriter, HlogError> {
        let p = path.display().to_string();
        let f = std::fs::File::create(path).map_err(|source| HlogError::Io {
            path: p.clone(),
            source,
        })?;
        let mut w = HlogWriter {
            path: path.into(),
            file: std::io::BufWriter::new(f),
            prev: None,
        };
        let mut buf = Vec::new();
        let mut ser = V2Serializer::new();
        IntervalLogWriterBuilder::new()
            .add_comment("ringvm block metrics: latencies in ns, batch sizes in requests")
            .with_start_time(started)
            .with_base_time(started)
            .begin_log_with(&mut buf, &mut ser)
            .map_err(|source| HlogError::Io {
                path: p.clone(),
                source,
            })?;
        w.file
            .write_all(&buf)
            .map_err(|source| HlogError::Io { path: p, source })?;
        Ok(w)
    }

    /// Writes the intervals between the previous snapshot and `report` (a later snapshot of
    /// the same pool), and flushes.
    pub fn append(&mut self, report: &Report) -> Result<(), HlogError> {
        let p = self.path.display().to_string();
        let from = self.prev.as_ref().map_or(Duration::ZERO, |r| r.elapsed);
        let dur = report
            .elapsed
            .saturating_sub(from)
            .max(Duration::from_micros(1));
        let mut buf = Vec::new();
        let mut ser = V2Serializer::new();
        let mut w = IntervalLogWriterBuilder::new()
            .begin_log_with(&mut buf, &mut ser)
            .map_err(|source| HlogError::Io {
                path: p.clone(),
                source,
            })?;
        for q in &report.queues {
            let before = self.prev.as_ref().and_then(|r| {
                r.queues
                    .iter()
                    .find(|o| o.device == q.device && o.queue == q.queue)
            });
            for (what, h, old) in [
                (
                    "k2c",
                    &q.kick_to_complete,
                    before.map(|b| &b.kick_to_complete),
                ),
                ("svc", &q.service, before.map(|b| &b.service)),
                ("batch", &q.batch, before.map(|b| &b.batch)),
            ] {
                let mut delta = h.clone();
                if let Some(old) = old {
                    // Counts only grow between snapshots; a queue reset in between shows
                    // up as a failed subtraction, and then the whole histogram is written.
                    if delta.subtract(old).is_err() {
                        delta = h.clone();
                    }
                }
                let tag = tag_of(q, what);
                w.write_histogram(&delta, from, dur, Tag::new(&tag))
                    .map_err(|e| HlogError::Encode {
                        path: p.clone(),
                        message: e.to_string(),
                    })?;
            }
        }
        drop(w);
        self.file.write_all(&buf).map_err(|source| HlogError::Io {
            path: p.clone(),
            source,
        })?;
        self.file
            .flush()
            .map_err(|source| HlogError::Io { path: p, source })?;
        self.prev = Some(report.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    use super::super::{QueueMetrics, QueueRecorder, ReactorMetrics};
    use super::*;

    /// The exact bytes the hand-built JSON writer produced for this report (captured from it
    /// before the move to serde), plus the latency sums added after the poll hits since:
    /// `--stats-json` and `ringvm bench --json` readers see only that addition.
    #[test]
    fn test_json_report_matches_previous_writer_bytewise() {
        let mut rec = QueueRecorder::new("q\"x", 1, 2);
        rec.record_k2c(Duration::from_nanos(1234));
        rec.record_k2c(Duration::from_nanos(7));
        rec.record_batch(8);
        let mut q = QueueMetrics::of(&rec);
        q.counters.writes = 2;
        q.counters.bytes_written = 8192;
        let report = Report {
            reactors: vec![ReactorMetrics {
                index: 2,
                core: 1,
                busy_ns: 5,
                idle_ns: 6,
                passes: 7,
                enters: 8,
            }],
            queues: vec![q],
            elapsed: Duration::from_nanos(1_234_567_891),
        };
        let expected = r#"{"elapsed_ns":1234567891,"busy_ns_per_request":2,"queues":[{"device":"q\"x","queue":1,"reactor":2,"requests":2,"reads":0,"writes":2,"flushes":0,"get_ids":0,"discards":0,"write_zeroes":0,"unsupported":0,"errors":0,"bytes_read":0,"bytes_written":8192,"kicks":0,"irqs_sent":0,"irqs_suppressed":0,"poll_hits":0,"k2c_sum_ns":1241,"service_sum_ns":0,"kick_to_complete_ns":{"count":2,"min":7,"mean":620.5,"p50":7,"p90":1234,"p99":1234,"p99_9":1234,"max":1234,"buckets":[[7,1],[1234,1]]},"service_ns":{"count":0,"min":0,"mean":0.0,"p50":0,"p90":0,"p99":0,"p99_9":0,"max":0,"buckets":[]},"batch":{"count":1,"min":8,"mean":8.0,"p50":8,"p90":8,"p99":8,"p99_9":8,"max":8,"buckets":[[8,1]]}}],"reactors":[{"index":2,"core":1,"busy_ns":5,"idle_ns":6,"passes":7,"enters":8}]}"#;
        assert_eq!(report.to_json(), expected);
        assert_eq!(
            report.to_json_value(),
            serde_json::from_str::<serde_json::Value>(expected).unwrap()
        );
    }

    fn sample() -> Report {
        let mut rec = QueueRecorder::new("disk \"a\"", 0, 0);
        for i in 1..=1000u64 {
            rec.record_k2c(Duration::from_nanos(i * 1000));
            rec.record_service(Duration::from_nanos(i * 500));
        }
        rec.record_batch(8);
        let mut q = QueueMetrics::of(&rec);
        q.counters.reads = 1000;
        Report {
            reactors: vec![ReactorMetrics {
                index: 0,
                core: 1,
                busy_ns: 3_000_000,
                idle_ns: 1_000_000,
                passes: 10,
                enters: 10,
            }],
            queues: vec![q],
            elapsed: Duration::from_secs(1),
        }
    }

    #[test]
    fn test_table_lists_percentiles_in_microseconds() {
        let t = sample().table();
        assert!(t.contains("p99.9 µs"), "{t}");
        let row = t.lines().nth(1).unwrap();
        assert!(
            row.contains("500.") || row.contains("499."),
            "p50 of 1..1000 µs should read ~500: {row}"
        );
        assert!(t.contains("busy ns/request: 3000"), "{t}");
    }

    #[test]
    fn test_json_escapes_device_name_and_is_balanced() {
        let j = sample().to_json();
        assert!(j.contains("\"device\":\"disk \\\"a\\\"\""), "{j}");
        assert_eq!(j.matches('{').count(), j.matches('}').count());
        assert_eq!(j.matches('[').count(), j.matches(']').count());
        assert!(j.contains("\"reads\":1000"));
    }

    #[test]
    fn test_hlog_writer_appends_deltas_between_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.hlog");
        let mut first = sample();
        let mut w = HlogWriter::create(&path, SystemTime::now()).unwrap();
        w.append(&first).unwrap();
        first.queues[0].kick_to_complete.record(5_000).unwrap();
        first.elapsed = Duration::from_secs(2);
        w.append(&first).unwrap();
        let text = std::fs::read(&path).unwrap();
        let counts: Vec<(String, f64, u64)> = IntervalLogIterator::new(&text)
            .filter_map(|e| match e {
                Ok(LogEntry::Interval(i))
                    if i.tag().map(|t| t.as_str()) == Some("disk__a_-q0-k2c") =>
                {
                    let h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
                        .deserialize(&mut base64_decode(i.encoded_histogram()).as_slice())
                        .unwrap();
                    Some((
                        i.tag().unwrap().as_str().to_string(),
                        i.start_timestamp().as_secs_f64(),
                        h.len(),
                    ))
                }
                _ => None,
            })
            .collect();
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert_eq!(
            (counts[0].2, counts[1].2),
            (1000, 1),
            "second interval holds only the new sample"
        );
        assert_eq!(counts[1].1, 1.0);
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|&c| c != b'=') {
            acc = acc << 6 | T.iter().position(|&t| t == c).unwrap() as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }

    #[test]
    fn test_hlog_round_trips_tagged_intervals() {
        let mut buf = Vec::new();
        sample().write_hlog_to(&mut buf, &[]).unwrap();
        let tags: Vec<String> = IntervalLogIterator::new(&buf)
            .filter_map(|e| match e {
                Ok(LogEntry::Interval(i)) => i.tag().map(|t| t.as_str().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            tags,
            vec!["disk__a_-q0-k2c", "disk__a_-q0-svc", "disk__a_-q0-batch"]
        );
    }

    #[test]
    fn test_hlog_with_guest_tag_holds_host_and_guest_counts() {
        let mut guest =
            Histogram::<u64>::new_with_bounds(1, super::super::LATENCY_MAX_NS, 3).unwrap();
        guest.record_n(25_000, 700).unwrap();
        guest.record_n(90_000, 300).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.hlog");
        sample()
            .write_hlog_with(&path, &[("guest", &guest)])
            .unwrap();
        let text = std::fs::read(&path).unwrap();
        let got: Vec<(String, u64)> = IntervalLogIterator::new(&text)
            .filter_map(|e| match e {
                Ok(LogEntry::Interval(i)) => {
                    let h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
                        .deserialize(&mut base64_decode(i.encoded_histogram()).as_slice())
                        .unwrap();
                    Some((i.tag().unwrap().as_str().to_string(), h.len()))
                }
                Ok(_) => None,
                Err(e) => panic!("log does not parse: {e:?}"),
            })
            .collect();
        assert!(
            got.contains(&("disk__a_-q0-k2c".to_string(), 1000)),
            "{got:?}"
        );
        assert_eq!(got.last(), Some(&("guest".to_string(), 1000)), "{got:?}");
    }

    #[test]
    fn test_hlog_with_invalid_tag_is_an_error_not_a_panic() {
        let h = Histogram::<u64>::new(3).unwrap();
        let mut buf = Vec::new();
        let e = sample()
            .write_hlog_to(&mut buf, &[("a b,c", &h)])
            .unwrap_err();
        assert!(e.contains("tag"), "{e}");
    }
}
