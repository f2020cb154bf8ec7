//! Renders a [`ReportDoc`] as one self-contained HTML page: inline CSS and SVG, no scripts,
//! no fonts or images from elsewhere, so it opens offline and prints as it shows.

use std::fmt::Write as _;

use super::svg::{self, esc, Bar, Line, Scale, XAxis};
use super::{Latency, ReportDoc, Series};

/// Percentile samples per spectrum line (evenly spaced on the percentile axis).
const SPECTRUM_POINTS: usize = 240;
/// Percentiles in the table under the spectrum.
const TABLE_PCTS: [(f64, &str); 5] = [
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (99.99, "p99.99"),
];

/// Segments of the time-breakdown bars, innermost (host service) first.
pub const SEGMENTS: [(&str, &str); 4] = [
    ("host service (pop → complete)", "#4e79a7"),
    ("host kick→complete, beyond service", "#f28e2b"),
    ("guest-observed, beyond host kick→complete", "#59a14f"),
    ("guest-observed (no host data)", "#bab0ac"),
];

const STYLE: &str =
    "body{font-family:sans-serif;margin:24px;color:#222;background:#fff;max-width:1000px}\
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 6px}\
p.note{color:#555;font-size:13px;margin:4px 0 10px}\
table{border-collapse:collapse;font-size:13px;margin:8px 0 4px}\
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}\
table.meta td{text-align:left;vertical-align:top}table.meta td:first-child{font-weight:bold}\
.sw{display:inline-block;width:10px;height:10px;margin-right:6px}\
svg.chart{display:block;max-width:100%;height:auto;border:1px solid #eee}";

fn us(ns: u64) -> String {
    svg::fmt_num(ns as f64 / 1000.0)
}

fn opt_us(ns: Option<u64>) -> String {
    ns.map(us).unwrap_or_else(|| "—".into())
}

/// The spectrum line of one series, (percentile, µs) points.
pub fn spectrum(l: &Latency) -> Vec<(f64, f64)> {
    match l {
        Latency::Buckets(_) => svg::pct_samples(SPECTRUM_POINTS)
            .into_iter()
            .filter_map(|p| l.value_at(p).map(|v| (p, v as f64 / 1000.0)))
            .collect(),
        Latency::Percentiles(p) => p
            .iter()
            .filter(|(q, _)| (svg::PCT_LO - 1e-9..=svg::PCT_HI + 1e-9).contains(q))
            .map(|&(q, v)| (q, v as f64 / 1000.0))
            .collect(),
        Latency::None => Vec::new(),
    }
}

fn swatch(i: usize, name: &str) -> String {
    format!(
        "<span class=\"sw\" style=\"background:{}\"></span>{}",
        svg::color(i),
        esc(name)
    )
}

fn table(s: &mut String, head: &[&str], rows: &[Vec<String>]) {
    s.push_str("<table><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            // Cells are escaped by their producers (the first one may hold a swatch).
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
}

fn spectrum_section(s: &mut String, series: &[Series]) {
    s.push_str("<h2>Latency by percentile</h2><p class=\"note\">Each line is one latency distribution read at every percentile from p50 to p99.99. The x axis is log(1/(1−p)), so each extra nine gets the same width (HdrHistogram's plot). The y axis is log scale when the values span more than two decades.</p>");
    let lines: Vec<Line> = series
        .iter()
        .enumerate()
        .map(|(i, x)| Line {
            name: &x.name,
            color: svg::color(i),
            points: spectrum(&x.latency),
        })
        .collect();
    let ys = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::MAX, 0.0f64), |(a, b), y| (a.min(y), b.max(y)));
    let scale = Scale::for_range(lo, hi);
    s.push_str(&svg::line_chart(
        "Latency by percentile",
        &XAxis::Percentile,
        &scale,
        "latency (µs)",
        &lines,
    ));
    let mut head = vec!["series", "samples"];
    head.extend(TABLE_PCTS.iter().map(|&(_, l)| l));
    head.push("max");
    let rows: Vec<Vec<String>> = series
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let mut r = vec![
                swatch(i, &x.name),
                x.latency
                    .count()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "—".into()),
            ];
            r.extend(
                TABLE_PCTS
                    .iter()
                    .map(|&(p, _)| opt_us(x.latency.value_at(p))),
            );
            r.push(opt_us(x.latency.max()));
            r
        })
        .collect();
    table(s, &head, &rows);
    s.push_str("<p class=\"note\">Latency in µs.</p>");
}

fn iops_section(s: &mut String, series: &[Series]) {
    s.push_str("<h2>IOPS per second</h2><p class=\"note\">Completed I/Os in each second of the measured run, counted by the guest (blkbench's progress lines or fio's status), so every VMM is measured the same way.</p>");
    let lines: Vec<Line> = series
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.iops_per_s.is_empty())
        .map(|(i, x)| Line {
            name: &x.name,
            color: svg::color(i),
            points: x
                .iops_per_s
                .iter()
                .enumerate()
                .map(|(k, &v)| ((k + 1) as f64, v))
                .collect(),
        })
        .collect();
    if lines.is_empty() {
        s.push_str("<p class=\"note\">No per-second samples: the runs were shorter than a second, or the guest did not report progress.</p>");
    } else {
        let max_y = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let max_x = lines.iter().map(|l| l.points.len()).max().unwrap_or(1) as f64;
        s.push_str(&svg::line_chart(
            "IOPS per second",
            &XAxis::Linear {
                max: max_x,
                label: "second of the measured run",
            },
            &Scale::linear(max_y * 1.05),
            "IOPS",
            &lines,
        ));
    }
    let rows: Vec<Vec<String>> = series
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let v = &x.iops_per_s;
            let f = |o: Option<f64>| o.map(|n| format!("{n:.0}")).unwrap_or_else(|| "—".into());
            let mean = x
                .iops
                .or_else(|| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64));
            vec![
                swatch(i, &x.name),
                f(mean),
                f(v.iter().copied().reduce(f64::min)),
                f(v.iter().copied().reduce(f64::max)),
                v.len().to_string(),
            ]
        })
        .collect();
    table(
        s,
        &[
            "series",
            "mean IOPS",
            "slowest second",
            "fastest second",
            "seconds",
        ],
        &rows,
    );
}

/// The bar segments of one series: [service, k2c − service, guest − k2c, guest only].
pub fn segments(x: &Series) -> Option<[f64; 4]> {
    let guest = x.p50.guest.or_else(|| x.latency.value_at(50.0))? as f64 / 1000.0;
    let k2c = x.p50.host_k2c.map(|v| v as f64 / 1000.0);
    let svc = x.p50.host_service.map(|v| v as f64 / 1000.0);
    Some(match (k2c, svc) {
        (Some(k), Some(v)) => {
            let v = v.min(k).min(guest);
            let k = k.min(guest);
            [v, k - v, guest - k, 0.0]
        }
        (Some(k), None) => {
            let k = k.min(guest);
            [0.0, k, guest - k, 0.0]
        }
        _ => [0.0, 0.0, 0.0, guest],
    })
}

fn breakdown_section(s: &mut String, series: &[Series]) {
    s.push_str("<h2>Where the time goes (p50)</h2><p class=\"note\">One bar per series, as long as the guest-observed median latency. Inside it: the host's median service time (avail-ring pop to completion), the rest of the host's median kick→complete (kick wake-up, queueing, used-ring publish), and the rest of what the guest saw (the kick's VM exit, interrupt delivery, the guest driver). Medians of phases do not add up exactly; each segment is a difference of medians.</p>");
    let segs: Vec<(&Series, [f64; 4])> = series
        .iter()
        .filter_map(|x| segments(x).map(|v| (x, v)))
        .collect();
    if segs.is_empty() {
        s.push_str("<p class=\"note\">No latency data.</p>");
        return;
    }
    let used: Vec<usize> = (0..4)
        .filter(|&k| segs.iter().any(|(_, v)| v[k] > 0.0))
        .collect();
    let legend: Vec<(&str, &str)> = used.iter().map(|&k| SEGMENTS[k]).collect();
    let bars: Vec<Bar> = segs
        .iter()
        .map(|(x, v)| Bar {
            label: &x.name,
            segments: used.iter().map(|&k| v[k]).collect(),
        })
        .collect();
    s.push_str(&svg::stacked_bars(
        "Where the time goes (p50)",
        "µs (median)",
        &legend,
        &bars,
    ));
    let rows: Vec<Vec<String>> = series
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let guest = x.p50.guest.or_else(|| x.latency.value_at(50.0));
            let diff = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => format!("{:.1}", (a as f64 - b as f64) / 1000.0),
                _ => "—".into(),
            };
            vec![
                swatch(i, &x.name),
                opt_us(guest),
                opt_us(x.p50.host_k2c),
                opt_us(x.p50.host_service),
                diff(guest, x.p50.host_k2c),
                diff(x.p50.host_k2c, x.p50.host_service),
            ]
        })
        .collect();
    table(
        s,
        &[
            "series",
            "guest p50",
            "host k2c p50",
            "host service p50",
            "guest − k2c",
            "k2c − service",
        ],
        &rows,
    );
    s.push_str("<p class=\"note\">µs; — where the VMM gives no host-side histograms.</p>");
}

/// The whole page.
pub fn render(doc: &ReportDoc) -> String {
    let mut s = String::with_capacity(64 << 10);
    let _ = write!(
        s,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body><h1>{}</h1>",
        esc(&doc.title),
        esc(&doc.title)
    );
    if !doc.meta.is_empty() {
        s.push_str("<table class=\"meta\">");
        for (k, v) in &doc.meta {
            let _ = write!(s, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
        }
        s.push_str("</table>");
    }
    if doc.series.is_empty() {
        s.push_str("<p>No series to show.</p>");
    } else {
        spectrum_section(&mut s, &doc.series);
        iops_section(&mut s, &doc.series);
        breakdown_section(&mut s, &doc.series);
    }
    s.push_str("<p class=\"note\">Written by ringvm report.</p></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::super::Breakdown;
    use super::*;

    fn series(name: &str, k2c: Option<u64>) -> Series {
        Series {
            name: name.into(),
            latency: Latency::Buckets((1..=1000).map(|v| (v * 100, 1)).collect()),
            iops: Some(1000.0),
            iops_per_s: vec![900.0, 1100.0],
            p50: Breakdown {
                guest: Some(50_000),
                host_k2c: k2c,
                host_service: k2c.map(|k| k / 2),
            },
        }
    }

    #[test]
    fn test_render_is_self_contained_with_three_charts_and_legends() {
        let doc = ReportDoc {
            title: "t <1>".into(),
            meta: vec![("command".into(), "ringvm bench --rw \"x\"".into())],
            series: vec![series("ringvm", Some(20_000)), series("qemu & co", None)],
        };
        let h = render(&doc);
        assert_eq!(h.matches("<svg").count(), 3);
        assert!(!h.contains("<script") && !h.contains("http:") && !h.contains("https:"));
        assert!(h.contains("t &lt;1&gt;") && h.contains("&quot;x&quot;"));
        assert!(h.contains(">qemu &amp; co</text>"), "legend entry escaped");
        assert!(h.contains(SEGMENTS[0].0) && h.contains(SEGMENTS[3].0));
    }

    #[test]
    fn test_segments_split_guest_median_into_phases() {
        let s = segments(&series("a", Some(20_000))).unwrap();
        assert_eq!(s, [10.0, 10.0, 30.0, 0.0]);
        let s = segments(&series("b", None)).unwrap();
        assert_eq!(s, [0.0, 0.0, 0.0, 50.0]);
        // Host phases longer than the guest's median are clamped, never negative.
        let s = segments(&series("c", Some(80_000))).unwrap();
        assert!(s.iter().all(|&v| v >= 0.0) && (s.iter().sum::<f64>() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn test_spectrum_percentile_input_keeps_p50_to_p9999() {
        let l = Latency::Percentiles(vec![(1.0, 1), (50.0, 2000), (99.99, 9000), (99.999, 1)]);
        assert_eq!(spectrum(&l), vec![(50.0, 2.0), (99.99, 9.0)]);
        let b = spectrum(&series("a", None).latency);
        assert_eq!(b.len(), SPECTRUM_POINTS);
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "monotone");
    }

    #[test]
    fn test_render_empty_doc_says_so() {
        let h = render(&ReportDoc::default());
        assert!(h.contains("No series"));
    }
}
