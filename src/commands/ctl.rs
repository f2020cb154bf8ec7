//! `ringvm ctl`: the API socket's client.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use ringvm::api::client::{request, Reply, Session};
use ringvm::cli::{CtlAction, CtlArgs};
use ringvm::metrics::Report;

/// Parses `disk=ID poll-us=N` (either order) into the PATCH path and body.
fn set_request(assignments: &[String]) -> anyhow::Result<(String, String)> {
    let mut target = None;
    let mut poll_us = None;
    for a in assignments {
        let Some((k, v)) = a.split_once('=') else {
            bail!("Expected KEY=VALUE, not `{a}` (e.g. `set disk=blk0 poll-us=16`)");
        };
        match k {
            "disk" | "net" if !v.is_empty() => target = Some(format!("/{k}s/{v}")),
            "poll-us" => {
                let n: u64 = v
                    .parse()
                    .with_context(|| format!("Invalid poll-us `{v}`: expected microseconds"))?;
                poll_us = Some(n);
            }
            _ => bail!("Unknown setting `{a}` (expected disk=ID or net=ID, and poll-us=N)"),
        }
    }
    match (target, poll_us) {
        (Some(t), Some(n)) => Ok((t, format!("{{\"poll_us\":{n}}}"))),
        _ => bail!("`set` needs disk=ID (or net=ID) and poll-us=N"),
    }
}

/// `--every-ms`: GETs `path` every `ms` on one connection until `count` or the VM ends,
/// writes each answer to stdout and the answer times' summary to stderr.
fn watch(sock: &Path, path: &str, ms: f64, count: Option<u64>) -> anyhow::Result<()> {
    if !(ms.is_finite() && ms > 0.0) {
        bail!("--every-ms must be a positive number of milliseconds, not {ms}");
    }
    let period = Duration::from_secs_f64(ms / 1e3);
    let mut session = Session::connect(sock)?;
    let mut times = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .expect("constant histogram bounds are valid");
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    let mut next = start;
    let mut ended = None;
    let mut unavailable = 0u64;
    while count.is_none_or(|c| times.len() < c) {
        let t = Instant::now();
        match session.get(path) {
            Ok((status, body)) if status < 400 => {
                times.saturating_record(t.elapsed().as_nanos() as u64);
                if out.write_all(body).is_err() {
                    break;
                }
            }
            // 503 between bench jobs or while the VM stops: a scraper carries on.
            Ok((status, _)) if status >= 500 => unavailable += 1,
            Ok((status, body)) => {
                bail!(
                    "GET {path}: {} ({status})",
                    String::from_utf8_lossy(body).trim()
                )
            }
            Err(e) => {
                ended = Some(e);
                break;
            }
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            // Late (the answer took longer than the period): start again from now.
            next = now;
        }
    }
    let _ = out.flush();
    let secs = start.elapsed().as_secs_f64();
    let us = |q: f64| times.value_at_quantile(q) as f64 / 1e3;
    eprintln!(
        "ringvm ctl: {} scrapes of {path} in {secs:.2} s ({:.1}/s, {unavailable} answered 5xx); answer time p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs{}",
        times.len(),
        times.len() as f64 / secs.max(1e-9),
        us(0.5),
        us(0.99),
        times.max() as f64 / 1e3,
        match &ended {
            Some(e) => format!(" (ended: {e})"),
            None => String::new(),
        }
    );
    match ended {
        Some(e) if times.is_empty() => Err(e.into()),
        _ => Ok(()),
    }
}

/// `ringvm ctl`: sends one request and prints the answer; a 4xx/5xx is an error.
pub fn ctl(args: &CtlArgs) -> anyhow::Result<u8> {
    let sock = &args.api_socket;
    let send = |method: &str, path: &str, body: Option<&str>| -> anyhow::Result<Reply> {
        let r = request(sock, method, path, body)?;
        if r.status >= 400 {
            bail!("{} {path}: {} ({})", method, r.error_message(), r.status);
        }
        Ok(r)
    };
    match &args.action {
        CtlAction::Vm => print!("{}", send("GET", "/vm", None)?.body),
        CtlAction::Stats { json: true } => print!("{}", send("GET", "/stats", None)?.body),
        CtlAction::Stats { json: false } => {
            let r = send("GET", "/stats", None)?;
            let report = Report::from_json(&r.body)
                .map_err(|e| anyhow::anyhow!("Malformed /stats answer: {e}"))?;
            print!("{}", report.table());
        }
        CtlAction::Metrics { every_ms: None, .. } => {
            print!("{}", send("GET", "/metrics", None)?.body)
        }
        CtlAction::Metrics {
            every_ms: Some(ms),
            count,
        } => watch(sock, "/metrics", *ms, *count)?,
        CtlAction::Interval => print!("{}", send("PUT", "/stats/interval", None)?.body),
        CtlAction::Set { assignments } => {
            let (path, body) = set_request(assignments)?;
            print!("{}", send("PATCH", &path, Some(&body))?.body);
        }
        CtlAction::Stop => print!("{}", send("PUT", "/vm/stop", None)?.body),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(a: &[&str]) -> anyhow::Result<(String, String)> {
        set_request(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn test_set_request_either_order_builds_patch() {
        let want = ("/disks/blk0".to_string(), "{\"poll_us\":16}".to_string());
        assert_eq!(set(&["disk=blk0", "poll-us=16"]).unwrap(), want);
        assert_eq!(set(&["poll-us=16", "disk=blk0"]).unwrap(), want);
        assert_eq!(set(&["net=net0", "poll-us=0"]).unwrap().0, "/nets/net0");
    }

    #[test]
    fn test_set_request_bad_words_say_what_is_expected() {
        for (a, says) in [
            (&["disk=blk0", "poll-us=x"][..], "Invalid poll-us"),
            (&["disk=", "poll-us=1"][..], "Unknown setting"),
            (&["cpu=1", "poll-us=1"][..], "Unknown setting"),
            (&["disk=blk0", "blk"][..], "KEY=VALUE"),
            (&["disk=blk0", "disk=blk1"][..], "needs disk=ID"),
        ] {
            let e = set(a).unwrap_err().to_string();
            assert!(e.contains(says), "{a:?}: {e}");
        }
    }
}
