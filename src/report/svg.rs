//! Inline-SVG charts: axis math (percentile axis, log and linear ticks), escaping, and the
//! three chart shapes the report draws (lines on a percentile axis, lines over time,
//! stacked horizontal bars). Pure string building: no I/O, no scripts, no external URLs.

use std::fmt::Write as _;

/// Readable qualitative colours (Tableau 10), one per series in order.
pub const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Colour of series `i`.
pub fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Escapes text for HTML/SVG element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Lowest percentile on the percentile axis.
pub const PCT_LO: f64 = 50.0;
/// Highest percentile on the percentile axis.
pub const PCT_HI: f64 = 99.99;
/// Labelled ticks of the percentile axis.
pub const PCT_TICKS: [(f64, &str); 5] = [
    (50.0, "50%"),
    (90.0, "90%"),
    (99.0, "99%"),
    (99.9, "99.9%"),
    (99.99, "99.99%"),
];

/// HdrHistogram's percentile axis: log10(1 / (1 - p)), so 50 % → 0.30, 90 % → 1, 99 % → 2,
/// 99.9 % → 3 and every further nine is one more unit.
pub fn pct_axis(pct: f64) -> f64 {
    let tail = (1.0 - pct / 100.0).max(1e-12);
    -tail.log10()
}

/// The percentile at axis position `x` (inverse of [`pct_axis`]).
pub fn axis_pct(x: f64) -> f64 {
    100.0 * (1.0 - 10f64.powf(-x))
}

/// `n` percentiles from [`PCT_LO`] to [`PCT_HI`], evenly spaced on the percentile axis.
pub fn pct_samples(n: usize) -> Vec<f64> {
    let (a, b) = (pct_axis(PCT_LO), pct_axis(PCT_HI));
    let n = n.max(2);
    (0..n)
        .map(|i| axis_pct(a + (b - a) * i as f64 / (n - 1) as f64))
        .collect()
}

/// A y axis: linear from 0 (nice ticks) or logarithmic (1-2-5 ticks per decade).
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    pub ticks: Vec<f64>,
}

impl Scale {
    /// A scale covering `min..=max` (positive values): logarithmic when the range spans
    /// more than two decades, else linear from zero.
    pub fn for_range(min: f64, max: f64) -> Scale {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        let min = if min.is_finite() && min > 0.0 {
            min.min(max)
        } else {
            max
        };
        if max / min > 100.0 {
            Scale::log(min, max)
        } else {
            Scale::linear(max)
        }
    }

    /// Linear from 0 to a nice value at or above `max`.
    pub fn linear(max: f64) -> Scale {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        let step = nice_step(max / 5.0);
        let hi = (max / step).ceil() * step;
        let n = (hi / step).round() as usize;
        let ticks = (0..=n).map(|i| i as f64 * step).collect();
        Scale {
            lo: 0.0,
            hi,
            log: false,
            ticks,
        }
    }

    /// Logarithmic from the 1-2-5 value at or below `min` to the one at or above `max`,
    /// ticks at 1, 2 and 5 of every decade in between.
    pub fn log(min: f64, max: f64) -> Scale {
        let lo = step_125(min, false);
        let hi = step_125(max, true);
        let mut ticks = Vec::new();
        let mut d = 10f64.powf(lo.log10().floor());
        while d <= hi * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let t = d * m;
                if t >= lo * 0.9999 && t <= hi * 1.0001 {
                    ticks.push(t);
                }
            }
            d *= 10.0;
        }
        Scale {
            lo,
            hi,
            log: true,
            ticks,
        }
    }

    /// Position of `v` in 0..=1 (clamped).
    pub fn frac(&self, v: f64) -> f64 {
        let f = if self.log {
            let v = v.max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// The 1, 2 or 5 times a power of ten nearest `v` from above (`up`) or below.
fn step_125(v: f64, up: bool) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    let cands = [p, 2.0 * p, 5.0 * p, 10.0 * p];
    if up {
        cands
            .into_iter()
            .find(|&c| c >= v * 0.9999)
            .unwrap_or(10.0 * p)
    } else {
        cands
            .into_iter()
            .rev()
            .find(|&c| c <= v * 1.0001)
            .unwrap_or(p)
    }
}

/// 1, 2 or 5 times a power of ten, at or above `raw`.
pub fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if p * m >= raw * 0.999_999 {
            return p * m;
        }
    }
    p * 10.0
}

/// A number for an axis label: no trailing zeros, thousands as "k".
pub fn fmt_num(v: f64) -> String {
    if v >= 10_000.0 {
        let k = v / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else if v >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A line: its name (legend) and points in data coordinates.
pub struct Line<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// What an x axis shows.
pub enum XAxis {
    /// Percentile, placed with [`pct_axis`], labelled 50% … 99.99%.
    Percentile,
    /// A linear quantity (seconds), with its label.
    Linear { max: f64, label: &'static str },
}

const W: f64 = 960.0;
const PLOT_H: f64 = 340.0;
const ML: f64 = 78.0;
const MR: f64 = 24.0;
const MT: f64 = 16.0;
const MB: f64 = 52.0;
const LEGEND_ROW: f64 = 22.0;
const LEGEND_COLS: usize = 3;

fn legend(s: &mut String, top: f64, items: &[(&str, &str)]) {
    s.push_str("<g class=\"legend\">");
    let col_w = (W - ML - MR) / LEGEND_COLS as f64;
    for (i, (name, color)) in items.iter().enumerate() {
        let x = ML + (i % LEGEND_COLS) as f64 * col_w;
        let y = top + (i / LEGEND_COLS) as f64 * LEGEND_ROW;
        let _ = write!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{y:.1}\" dominant-baseline=\"middle\">{}</text>",
            y - 5.0,
            esc(color),
            x + 20.0,
            esc(name)
        );
    }
    s.push_str("</g>");
}

fn legend_height(n: usize) -> f64 {
    n.div_ceil(LEGEND_COLS) as f64 * LEGEND_ROW + 8.0
}

fn open_svg(s: &mut String, h: f64, title: &str) {
    let _ = write!(
        s,
        "<svg class=\"chart\" viewBox=\"0 0 {W} {h:.0}\" width=\"{W}\" height=\"{h:.0}\" role=\"img\" aria-label=\"{}\" font-family=\"sans-serif\" font-size=\"13\"><rect width=\"{W}\" height=\"{h:.0}\" fill=\"#ffffff\"/>",
        esc(title)
    );
}

fn y_axis(s: &mut String, y: &Scale, label: &str) {
    let pw = W - ML - MR;
    for &t in &y.ticks {
        let py = MT + PLOT_H * (1.0 - y.frac(t));
        let major = !y.log || (t.log10() - t.log10().round()).abs() < 1e-9;
        let _ = write!(
            s,
            "<line x1=\"{ML}\" x2=\"{:.1}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"{}\"/><text x=\"{:.1}\" y=\"{py:.1}\" text-anchor=\"end\" dominant-baseline=\"middle\">{}</text>",
            ML + pw,
            if major { "#d0d0d0" } else { "#ececec" },
            ML - 6.0,
            fmt_num(t)
        );
    }
    let _ = write!(
        s,
        "<text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        MT + PLOT_H / 2.0,
        esc(label)
    );
}

/// A line chart; `x` decides the x axis, `y` the y axis (values already in its unit).
pub fn line_chart(title: &str, x: &XAxis, y: &Scale, y_label: &str, lines: &[Line]) -> String {
    let pw = W - ML - MR;
    let h = MT + PLOT_H + MB + legend_height(lines.len());
    let mut s = String::new();
    open_svg(&mut s, h, title);
    y_axis(&mut s, y, y_label);
    let (x0, x1) = match x {
        XAxis::Percentile => (pct_axis(PCT_LO), pct_axis(PCT_HI)),
        XAxis::Linear { max, .. } => (0.0, max.max(1.0)),
    };
    let px = |v: f64| {
        let xv = match x {
            XAxis::Percentile => pct_axis(v),
            XAxis::Linear { .. } => v,
        };
        ML + pw * ((xv - x0) / (x1 - x0)).clamp(0.0, 1.0)
    };
    let py = |v: f64| MT + PLOT_H * (1.0 - y.frac(v));
    let x_ticks: Vec<(f64, String)> = match x {
        XAxis::Percentile => PCT_TICKS.iter().map(|&(p, l)| (p, l.to_string())).collect(),
        XAxis::Linear { max, .. } => {
            // Whole seconds: no tick between samples.
            let step = nice_step(max.max(1.0) / 8.0).max(1.0);
            let n = (max.max(1.0) / step).floor() as usize;
            (0..=n)
                .map(|i| (i as f64 * step, fmt_num(i as f64 * step)))
                .collect()
        }
    };
    for (v, l) in &x_ticks {
        let xp = px(*v);
        let _ = write!(
            s,
            "<line x1=\"{xp:.1}\" x2=\"{xp:.1}\" y1=\"{MT}\" y2=\"{:.1}\" stroke=\"#e4e4e4\"/><text x=\"{xp:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            MT + PLOT_H,
            MT + PLOT_H + 18.0,
            esc(l)
        );
    }
    let x_label = match x {
        XAxis::Percentile => "percentile (log scale of 1/(1−p))",
        XAxis::Linear { label, .. } => label,
    };
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        ML + pw / 2.0,
        MT + PLOT_H + 40.0,
        esc(x_label)
    );
    let _ = write!(
        s,
        "<rect x=\"{ML}\" y=\"{MT}\" width=\"{pw:.1}\" height=\"{PLOT_H}\" fill=\"none\" stroke=\"#888888\"/>"
    );
    for l in lines {
        if l.points.is_empty() {
            continue;
        }
        let pts: Vec<String> = l
            .points
            .iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", px(a), py(b)))
            .collect();
        let _ = write!(
            s,
            "<polyline class=\"series\" fill=\"none\" stroke=\"{}\" stroke-width=\"2.2\" stroke-linejoin=\"round\" points=\"{}\"><title>{}</title></polyline>",
            esc(l.color),
            pts.join(" "),
            esc(l.name)
        );
        if l.points.len() < 40 {
            for &(a, b) in &l.points {
                let _ = write!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                    px(a),
                    py(b),
                    esc(l.color)
                );
            }
        }
    }
    let items: Vec<(&str, &str)> = lines.iter().map(|l| (l.name, l.color)).collect();
    legend(&mut s, MT + PLOT_H + MB + 10.0, &items);
    s.push_str("</svg>");
    s
}

/// One stacked bar: its label and segments (segment index → value).
pub struct Bar<'a> {
    pub label: &'a str,
    pub segments: Vec<f64>,
}

const BAR_H: f64 = 26.0;
const BAR_GAP: f64 = 14.0;
const BAR_LABEL_W: f64 = 220.0;

/// Horizontal stacked bars, one per entry of `bars`; `segments` names and colours the
/// segments (the legend), values are in the x unit.
pub fn stacked_bars(title: &str, x_label: &str, segments: &[(&str, &str)], bars: &[Bar]) -> String {
    let left = BAR_LABEL_W;
    let pw = W - left - MR;
    let plot_h = bars.len() as f64 * (BAR_H + BAR_GAP) + BAR_GAP;
    let h = MT + plot_h + MB + legend_height(segments.len());
    let total_max = bars
        .iter()
        .map(|b| b.segments.iter().map(|v| v.max(0.0)).sum::<f64>())
        .fold(0.0, f64::max);
    let x = Scale::linear(total_max);
    let mut s = String::new();
    open_svg(&mut s, h, title);
    for &t in &x.ticks {
        let xp = left + pw * x.frac(t);
        let _ = write!(
            s,
            "<line x1=\"{xp:.1}\" x2=\"{xp:.1}\" y1=\"{MT}\" y2=\"{:.1}\" stroke=\"#e4e4e4\"/><text x=\"{xp:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            MT + plot_h,
            MT + plot_h + 18.0,
            fmt_num(t)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        left + pw / 2.0,
        MT + plot_h + 40.0,
        esc(x_label)
    );
    for (i, b) in bars.iter().enumerate() {
        let y = MT + BAR_GAP + i as f64 * (BAR_H + BAR_GAP);
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" dominant-baseline=\"middle\">{}</text>",
            left - 8.0,
            y + BAR_H / 2.0,
            esc(b.label)
        );
        let mut acc = 0.0;
        for (k, &v) in b.segments.iter().enumerate() {
            let v = v.max(0.0);
            if v == 0.0 {
                continue;
            }
            let (x0, x1) = (left + pw * x.frac(acc), left + pw * x.frac(acc + v));
            let (name, color) = segments.get(k).copied().unwrap_or(("", "#999999"));
            let _ = write!(
                s,
                "<rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{BAR_H}\" fill=\"{}\"><title>{}: {}</title></rect>",
                (x1 - x0).max(0.5),
                esc(color),
                esc(name),
                fmt_num(v)
            );
            acc += v;
        }
    }
    let _ = write!(
        s,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{MT}\" y2=\"{:.1}\" stroke=\"#888888\"/>",
        MT + plot_h
    );
    legend(&mut s, MT + plot_h + MB + 10.0, segments);
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pct_axis_each_nine_is_one_unit() {
        assert!((pct_axis(90.0) - 1.0).abs() < 1e-9);
        assert!((pct_axis(99.0) - 2.0).abs() < 1e-9);
        assert!((pct_axis(99.9) - 3.0).abs() < 1e-9);
        assert!((pct_axis(99.99) - 4.0).abs() < 1e-6);
        assert!((pct_axis(50.0) - 2f64.log10()).abs() < 1e-9);
        assert!((axis_pct(pct_axis(99.5)) - 99.5).abs() < 1e-9);
        assert!(pct_axis(100.0).is_finite(), "p100 must not be infinite");
    }

    #[test]
    fn test_pct_samples_span_p50_to_p9999_increasing() {
        let s = pct_samples(50);
        assert_eq!(s.len(), 50);
        assert!((s[0] - 50.0).abs() < 1e-9 && (s[49] - 99.99).abs() < 1e-6);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn test_scale_wide_range_is_log_with_decade_ticks() {
        let s = Scale::for_range(3.0, 25_000.0);
        assert!(s.log);
        assert_eq!((s.lo, s.hi), (2.0, 50_000.0));
        for d in [2.0, 5.0, 10.0, 100.0, 1000.0, 10_000.0, 20_000.0, 50_000.0] {
            assert!(s.ticks.iter().any(|&t| (t - d).abs() < 1e-6), "{d}");
        }
        assert!(
            s.ticks.iter().all(|t| (2.0..=50_000.0).contains(t)),
            "{s:?}"
        );
        assert!((s.frac(2.0)).abs() < 1e-9 && (s.frac(50_000.0) - 1.0).abs() < 1e-9);
        let s = Scale::log(1000.0, 1000.0 * 1000.0);
        assert_eq!((s.lo, s.hi), (1000.0, 1e6));
    }

    #[test]
    fn test_scale_narrow_range_is_linear_from_zero_with_nice_ticks() {
        let s = Scale::for_range(20.0, 87.0);
        assert!(!s.log);
        assert_eq!(s.lo, 0.0);
        assert_eq!(s.hi, 100.0);
        assert_eq!(s.ticks, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(s.frac(50.0), 0.5);
        assert_eq!(s.frac(1e9), 1.0);
    }

    #[test]
    fn test_scale_degenerate_input_stays_finite() {
        for (a, b) in [
            (0.0, 0.0),
            (f64::NAN, 5.0),
            (7.0, 7.0),
            (-1.0, f64::INFINITY),
        ] {
            let s = Scale::for_range(a, b);
            assert!(s.hi > s.lo && s.ticks.len() >= 2, "{a} {b}: {s:?}");
            assert!(s.frac(3.0).is_finite());
        }
    }

    #[test]
    fn test_nice_step_picks_1_2_5() {
        assert_eq!(nice_step(0.13), 0.2);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(2000.0), 2000.0);
        assert_eq!(fmt_num(20_000.0), "20k");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(0.05), "0.05");
    }

    #[test]
    fn test_esc_neutralises_markup_in_names() {
        assert_eq!(
            esc("<script>a&b</script> \"q\" 'x'"),
            "&lt;script&gt;a&amp;b&lt;/script&gt; &quot;q&quot; &#39;x&#39;"
        );
        let svg = line_chart(
            "t",
            &XAxis::Percentile,
            &Scale::linear(10.0),
            "µs",
            &[Line {
                name: "<b>evil</b>",
                color: "#000000",
                points: vec![(50.0, 1.0), (99.0, 2.0)],
            }],
        );
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("&lt;b&gt;evil&lt;/b&gt;"));
    }

    #[test]
    fn test_line_chart_places_percentile_ticks_in_order() {
        let svg = line_chart("t", &XAxis::Percentile, &Scale::linear(10.0), "µs", &[]);
        let pos: Vec<usize> = PCT_TICKS
            .iter()
            .map(|(_, l)| svg.find(&format!(">{l}<")).expect(l))
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
    }

    #[test]
    fn test_stacked_bars_draw_one_rect_per_nonzero_segment_and_legend() {
        let segs = [("a", "#111111"), ("b", "#222222"), ("c", "#333333")];
        let svg = stacked_bars(
            "t",
            "µs",
            &segs,
            &[Bar {
                label: "job",
                segments: vec![1.0, 0.0, 2.0],
            }],
        );
        assert_eq!(svg.matches("<title>").count(), 2, "{svg}");
        assert!(svg.contains("class=\"legend\""));
        for (n, _) in segs {
            assert!(svg.contains(&format!(">{n}</text>")));
        }
    }
}
