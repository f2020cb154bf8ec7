//! Builds the report's data model from `ringvm bench`'s job results.

use super::{Breakdown, Latency, ReportDoc, Series};
use crate::bench::JobResult;

/// One series per job: the guest's histogram (or its percentiles when it has none, as with
/// fio in the Linux guest), its per-second IOPS, and the p50 breakdown with the host's
/// merged kick→complete and service histograms.
pub fn from_jobs(title: &str, meta: Vec<(String, String)>, results: &[JobResult]) -> ReportDoc {
    let series = results
        .iter()
        .map(|r| {
            let g = &r.guest;
            let latency = match g.histogram() {
                Some(h) => Latency::Buckets(
                    h.iter_recorded()
                        .map(|v| {
                            (
                                h.highest_equivalent(v.value_iterated_to()),
                                v.count_at_value(),
                            )
                        })
                        .collect(),
                ),
                None => Latency::Percentiles(
                    [50.0, 90.0, 99.0, 99.9, 100.0]
                        .into_iter()
                        .zip(g.lat_ns)
                        .collect(),
                ),
            };
            let (k2c, svc) = r.host_merged();
            let p50 = |h: &hdrhistogram::Histogram<u64>| {
                (!h.is_empty()).then(|| h.value_at_quantile(0.5))
            };
            Series {
                name: r.job.label(),
                latency,
                iops: Some(g.iops),
                iops_per_s: g.iops_per_s.clone(),
                p50: Breakdown {
                    guest: Some(g.lat_ns[0]),
                    host_k2c: p50(&k2c),
                    host_service: p50(&svc),
                },
            }
        })
        .collect();
    ReportDoc {
        title: title.to_string(),
        meta,
        series,
    }
}
