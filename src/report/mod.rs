//! The HTML latency report: one renderer ([`html::render`]) fed by one small data model
//! ([`ReportDoc`]), built from `ringvm bench`'s results ([`from_jobs`]) or read from JSON
//! ([`ReportDoc::from_json`], the input of `ringvm report`, which perf/compare writes).
//!
//! Input JSON (every field but `series[].name` optional):
//! ```json
//! {"ringvm_report": 1, "title": "…", "meta": [["command", "…"], ["machine", "…"]],
//!  "series": [{"name": "ringvm", "hist": [[value_ns, count], …],
//!              "percentiles": [[99.9, value_ns], …], "iops": 41000.0,
//!              "iops_per_s": [40100, 41800, …],
//!              "p50_ns": {"guest": 24000, "host_k2c": 15000, "host_service": 9000}}]}
//! ```
//! `hist` (a latency histogram's buckets, blkbench's or HdrHistogram's) is preferred;
//! `percentiles` (e.g. fio's clat percentiles) is used when there is no `hist`.

pub mod html;
mod jobs;
pub mod svg;

pub use jobs::from_jobs;

use serde_json::Value;

/// Errors reading a report's input.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("The report input is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("The report input has an invalid field {field}: {why}")]
    Field { field: String, why: &'static str },
}

fn field(f: impl Into<String>, why: &'static str) -> ReportError {
    ReportError::Field {
        field: f.into(),
        why,
    }
}

/// A latency distribution.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Latency {
    /// Histogram buckets: (value ns, count), sorted by value.
    Buckets(Vec<(u64, u64)>),
    /// (percentile 0..=100, value ns), sorted by percentile.
    Percentiles(Vec<(f64, u64)>),
    #[default]
    None,
}

impl Latency {
    /// The value at `pct` (0..=100): the lowest bucket whose cumulative count reaches the
    /// rank, or the first listed percentile at or above `pct`.
    pub fn value_at(&self, pct: f64) -> Option<u64> {
        match self {
            Latency::Buckets(b) => {
                let total: u64 = b.iter().map(|&(_, c)| c).sum();
                if total == 0 {
                    return None;
                }
                let rank = ((pct / 100.0) * total as f64).ceil().max(1.0) as u64;
                let mut acc = 0;
                for &(v, c) in b {
                    acc += c;
                    if acc >= rank {
                        return Some(v);
                    }
                }
                b.last().map(|&(v, _)| v)
            }
            Latency::Percentiles(p) => p
                .iter()
                .find(|&&(q, _)| q >= pct - 1e-9)
                .or(p.last())
                .map(|&(_, v)| v),
            Latency::None => None,
        }
    }

    /// Number of samples (histograms only).
    pub fn count(&self) -> Option<u64> {
        match self {
            Latency::Buckets(b) => Some(b.iter().map(|&(_, c)| c).sum()),
            _ => None,
        }
    }

    /// Largest value seen (for percentiles: the highest listed).
    pub fn max(&self) -> Option<u64> {
        match self {
            Latency::Buckets(b) => b.iter().filter(|&&(_, c)| c > 0).map(|&(v, _)| v).max(),
            Latency::Percentiles(p) => p.last().map(|&(_, v)| v),
            Latency::None => None,
        }
    }
}

/// Medians of the phases of a request, ns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Breakdown {
    /// Submit to completion as the guest saw it.
    pub guest: Option<u64>,
    /// Host: kick (or poll pop) to used-ring publish.
    pub host_k2c: Option<u64>,
    /// Host: avail-ring pop to completion.
    pub host_service: Option<u64>,
}

/// One line in the charts: a VMM, or one job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub name: String,
    pub latency: Latency,
    /// Mean IOPS over the run.
    pub iops: Option<f64>,
    /// IOPS in each second of the measured run.
    pub iops_per_s: Vec<f64>,
    pub p50: Breakdown,
}

/// Everything the report shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportDoc {
    pub title: String,
    /// (key, value) lines of the metadata block: command, machine, …
    pub meta: Vec<(String, String)>,
    pub series: Vec<Series>,
}

fn pairs<T>(
    v: &Value,
    name: &str,
    f: impl Fn(&Value, &Value) -> Option<T>,
) -> Result<Vec<T>, ReportError> {
    let arr = v.as_array().ok_or_else(|| field(name, "not an array"))?;
    arr.iter()
        .map(|p| match p.as_array().map(Vec::as_slice) {
            Some([a, b]) => f(a, b).ok_or_else(|| field(name, "not a pair of numbers")),
            _ => Err(field(name, "not a list of [a, b] pairs")),
        })
        .collect()
}

fn series_from(i: usize, v: &Value) -> Result<Series, ReportError> {
    let at = |k: &str| format!("series[{i}].{k}");
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| field(at("name"), "missing or not a string"))?
        .to_string();
    let latency = if let Some(h) = v.get("hist") {
        let mut b = pairs(h, &at("hist"), |a, b| Some((a.as_u64()?, b.as_u64()?)))?;
        b.sort_unstable_by_key(|&(v, _)| v);
        Latency::Buckets(b)
    } else if let Some(p) = v.get("percentiles") {
        let mut p = pairs(p, &at("percentiles"), |a, b| {
            let q = a.as_f64()?;
            ((0.0..=100.0).contains(&q)).then_some((q, b.as_f64()? as u64))
        })?;
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        Latency::Percentiles(p)
    } else {
        Latency::None
    };
    let num = |k: &str| -> Result<Option<f64>, ReportError> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| field(at(k), "not a number")),
        }
    };
    let iops_per_s = match v.get("iops_per_s") {
        None | Some(Value::Null) => Vec::new(),
        Some(x) => x
            .as_array()
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| field(at("iops_per_s"), "not a list of numbers"))?,
    };
    let p50 = match v.get("p50_ns") {
        None | Some(Value::Null) => Breakdown::default(),
        Some(b) => {
            let g = |k: &str| -> Result<Option<u64>, ReportError> {
                match b.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(x) => x
                        .as_f64()
                        .filter(|f| *f >= 0.0)
                        .map(|f| Some(f as u64))
                        .ok_or_else(|| field(at("p50_ns"), "not a non-negative number")),
                }
            };
            Breakdown {
                guest: g("guest")?,
                host_k2c: g("host_k2c")?,
                host_service: g("host_service")?,
            }
        }
    };
    Ok(Series {
        name,
        latency,
        iops: num("iops")?,
        iops_per_s,
        p50,
    })
}

impl ReportDoc {
    /// Parses the `ringvm report` input (format in the module docs).
    pub fn from_json(text: &str) -> Result<ReportDoc, ReportError> {
        let v: Value = serde_json::from_str(text).map_err(ReportError::Json)?;
        if !v.is_object() {
            return Err(field("(top level)", "not an object"));
        }
        let title = v
            .get("title")
            .and_then(Value::as_str)
            .unwrap_or("ringvm latency report")
            .to_string();
        let meta = match v.get("meta") {
            None | Some(Value::Null) => Vec::new(),
            Some(m) => pairs(m, "meta", |a, b| {
                let s = |x: &Value| match x {
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                };
                Some((s(a)?, s(b)?))
            })?,
        };
        let series = v
            .get("series")
            .and_then(Value::as_array)
            .ok_or_else(|| field("series", "missing or not an array"))?
            .iter()
            .enumerate()
            .map(|(i, s)| series_from(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReportDoc {
            title,
            meta,
            series,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_from_json_reads_hist_percentiles_and_breakdown() {
        let d = ReportDoc::from_json(
            r#"{"title":"t","meta":[["command","x"],["n",3]],"series":[
                {"name":"a","hist":[[300,1],[100,2]],"iops":5,"iops_per_s":[4,6],
                 "p50_ns":{"guest":100,"host_k2c":60}},
                {"name":"fio","percentiles":[[99,50],[50,10]]}]}"#,
        )
        .unwrap();
        assert_eq!(d.meta[1], ("n".to_string(), "3".to_string()));
        let a = &d.series[0];
        assert_eq!(a.latency, Latency::Buckets(vec![(100, 2), (300, 1)]));
        assert_eq!((a.iops, a.iops_per_s.len()), (Some(5.0), 2));
        assert_eq!(a.p50.host_k2c, Some(60));
        assert_eq!(a.p50.host_service, None);
        assert_eq!(d.series[1].latency.value_at(90.0), Some(50));
        assert_eq!(d.series[1].latency.value_at(50.0), Some(10));
    }

    #[test]
    fn test_from_json_bad_input_names_the_field() {
        for (text, want) in [
            ("[1]", "top level"),
            (r#"{"series":[{"hist":[]}]}"#, "series[0].name"),
            (
                r#"{"series":[{"name":"a","hist":[[1]]}]}"#,
                "series[0].hist",
            ),
            (
                r#"{"series":[{"name":"a","iops_per_s":["x"]}]}"#,
                "iops_per_s",
            ),
            (r#"{"series":3}"#, "series"),
        ] {
            let e = ReportDoc::from_json(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(matches!(
            ReportDoc::from_json("{"),
            Err(ReportError::Json(_))
        ));
    }

    #[test]
    fn test_value_at_uses_cumulative_rank() {
        let l = Latency::Buckets((1..=100).map(|v| (v * 1000, 1)).collect());
        assert_eq!(l.value_at(50.0), Some(50_000));
        assert_eq!(l.value_at(99.0), Some(99_000));
        assert_eq!(l.value_at(99.99), Some(100_000));
        assert_eq!(l.value_at(0.0), Some(1000));
        assert_eq!(l.count(), Some(100));
        assert_eq!(Latency::Buckets(vec![]).value_at(50.0), None);
    }
}
