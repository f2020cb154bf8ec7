//! Reading a report back from its JSON form ([`Report::to_json`]), so a client of the API
//! socket (`ringvm ctl stats`) prints the same table as the exit report.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::Value;

use super::{QueueCounters, QueueMetrics, ReactorMetrics, Report};

fn u(v: &Value, k: &str) -> Result<u64, String> {
    v[k].as_u64()
        .ok_or_else(|| format!("missing or non-integer field `{k}`"))
}

/// Refills `h` from the `buckets` (`[value, count]` pairs) of a JSON histogram.
fn fill(h: &mut Histogram<u64>, v: &Value, what: &str) -> Result<(), String> {
    let buckets = v[what]["buckets"]
        .as_array()
        .ok_or_else(|| format!("missing `{what}.buckets`"))?;
    for b in buckets {
        let (Some(value), Some(count)) = (b[0].as_u64(), b[1].as_u64()) else {
            return Err(format!("malformed bucket in `{what}`: {b}"));
        };
        h.saturating_record_n(value.max(1), count);
    }
    Ok(())
}

impl Report {
    /// Parses what [`Report::to_json`] wrote. Histograms are rebuilt from their buckets,
    /// which hold each recorded bucket's highest equivalent value, so percentiles match.
    pub fn from_json(text: &str) -> Result<Report, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut r = Report {
            elapsed: Duration::from_nanos(u(&v, "elapsed_ns")?),
            ..Default::default()
        };
        for q in v["queues"].as_array().ok_or("missing `queues`")? {
            let device = q["device"].as_str().ok_or("missing `device`")?;
            let queue = u16::try_from(u(q, "queue")?).map_err(|_| "queue index out of range")?;
            let mut m = QueueMetrics::new(device, queue, u(q, "reactor")? as usize);
            m.counters = QueueCounters {
                reads: u(q, "reads")?,
                writes: u(q, "writes")?,
                flushes: u(q, "flushes")?,
                get_ids: u(q, "get_ids")?,
                discards: u(q, "discards")?,
                write_zeroes: u(q, "write_zeroes")?,
                unsupported: u(q, "unsupported")?,
                errors: u(q, "errors")?,
                bytes_read: u(q, "bytes_read")?,
                bytes_written: u(q, "bytes_written")?,
                kicks: u(q, "kicks")?,
                irqs_sent: u(q, "irqs_sent")?,
                irqs_suppressed: u(q, "irqs_suppressed")?,
                poll_hits: u(q, "poll_hits")?,
                // Absent from reports written before the sums were counted.
                k2c_sum_ns: q["k2c_sum_ns"].as_u64().unwrap_or(0),
                service_sum_ns: q["service_sum_ns"].as_u64().unwrap_or(0),
            };
            fill(&mut m.kick_to_complete, q, "kick_to_complete_ns")?;
            fill(&mut m.service, q, "service_ns")?;
            fill(&mut m.batch, q, "batch")?;
            r.queues.push(m);
        }
        for x in v["reactors"].as_array().ok_or("missing `reactors`")? {
            r.reactors.push(ReactorMetrics {
                index: u(x, "index")? as usize,
                core: u(x, "core")? as usize,
                busy_ns: u(x, "busy_ns")?,
                idle_ns: u(x, "idle_ns")?,
                passes: u(x, "passes")?,
                enters: u(x, "enters")?,
            });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::QueueRecorder;

    #[test]
    fn test_from_json_round_trips_the_table() {
        let mut rec = QueueRecorder::new("blk0", 1, 0);
        for i in 1..=500u64 {
            rec.record_k2c(Duration::from_nanos(i * 977));
            rec.record_service(Duration::from_nanos(i * 301));
        }
        rec.record_batch(4);
        let mut q = QueueMetrics::of(&rec);
        q.counters.reads = 500;
        q.counters.bytes_read = 500 * 4096;
        q.counters.poll_hits = 3;
        let r = Report {
            reactors: vec![ReactorMetrics {
                index: 0,
                core: 1,
                busy_ns: 10,
                idle_ns: 20,
                passes: 3,
                enters: 2,
            }],
            queues: vec![q],
            elapsed: Duration::from_millis(1500),
        };
        let back = Report::from_json(&r.to_json()).unwrap();
        assert_eq!(back.table(), r.table());
        assert_eq!(back.queues[0].counters, r.queues[0].counters);
        assert_eq!(back.elapsed, r.elapsed);
    }

    #[test]
    fn test_from_json_rejects_missing_fields() {
        let e =
            Report::from_json("{\"elapsed_ns\":1,\"queues\":[{}],\"reactors\":[]}").unwrap_err();
        assert!(e.contains("device"), "{e}");
        assert!(Report::from_json("not json").is_err());
    }
}
