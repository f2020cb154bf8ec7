//! `ringvm report`: renders the HTML latency report from a series JSON file (the one
//! renderer behind `ringvm bench --report` and `perf/compare --report`).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ringvm::cli::ReportArgs;
use ringvm::report::{html, ReportDoc};

/// `ringvm report --input SERIES.json --output REPORT.html`.
pub fn report(args: &ReportArgs) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("Cannot read {}", args.input.display()))?;
    let doc = ReportDoc::from_json(&text)
        .with_context(|| format!("Cannot use {}", args.input.display()))?;
    write(&args.output, &doc)?;
    Ok(0)
}

/// Renders `doc` to `path`.
pub fn write(path: &Path, doc: &ReportDoc) -> anyhow::Result<()> {
    std::fs::write(path, html::render(doc))
        .with_context(|| format!("Cannot write the report {}", path.display()))
}

/// Metadata every report from this process carries: command, date, machine, version.
pub fn common_meta() -> Vec<(String, String)> {
    let cmd: Vec<String> = std::env::args().collect();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    vec![
        ("command".into(), cmd.join(" ")),
        ("date".into(), utc_now()),
        (
            "machine".into(),
            format!("{cpu}, {nproc} CPUs, Linux {}", kernel.trim()),
        ),
        ("ringvm".into(), env!("CARGO_PKG_VERSION").into()),
    ]
}

/// "YYYY-MM-DD HH:MM UTC" (days to civil date: Howard Hinnant's algorithm).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
