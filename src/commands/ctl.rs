//! `ringvm ctl`: the API socket's client.

use anyhow::{bail, Context};
use ringvm::api::client::{request, Reply};
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
        CtlAction::Metrics => print!("{}", send("GET", "/metrics", None)?.body),
        CtlAction::Interval => print!("{}", send("PUT", "/stats/interval", None)?.body),
        CtlAction::Set { assignments } => {
            let (path, body) = set_request(assignments)?;
            print!("{}", send("PATCH", &path, Some(&body))?.body);
        }
        CtlAction::Stop => print!("{}", send("PUT", "/vm/stop", None)?.body),
    }
    Ok(0)
}
