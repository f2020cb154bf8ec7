//! `ringvm bench --linux`: the same jobs run by fio inside the Linux guest of
//! guests/linux (its /init runs `fio=ARGS` from the kernel command line against /dev/vda
//! and prints fio's JSON between markers), read back into blkbench's result shape so one
//! table shows both.

use serde_json::Value;

use super::result::{GuestResult, ResultError};
use super::{Job, Rw};

pub const JSON_BEGIN: &str = "===FIO-JSON-BEGIN===";
pub const JSON_END: &str = "===FIO-JSON-END===";

/// fio's options for `job` (the guest's /init adds `--filename=/dev/vda --ioengine=libaio
/// --direct=1 --output-format=json --name=ringvm`). `--lat_percentiles` makes fio report
/// submit→complete percentiles, which is what blkbench measures.
pub fn fio_args(job: &Job) -> String {
    let ms = |s: f64| (s * 1000.0).round() as u64;
    let mut a = format!(
        "--rw={} --bs={} --iodepth={} --numjobs={} --group_reporting --time_based \
         --runtime={}ms --ramp_time={}ms --lat_percentiles=1 --percentile_list=50:90:99:99.9",
        job.rw.as_str(),
        job.bs,
        job.qd,
        job.queues,
        ms(job.runtime_s),
        ms(job.ramp_s)
    );
    if job.rw == Rw::RandRw {
        a.push_str(" --rwmixread=50");
    }
    a
}

/// The Linux guest's kernel command line for `job`.
pub fn cmdline(job: &Job) -> String {
    format!("console=ttyS0 reboot=k fio=\"{}\"", fio_args(job))
}

fn last_lines(console: &str, n: usize) -> String {
    let tail: Vec<&str> = console.lines().rev().take(n).collect();
    if tail.is_empty() {
        return "(nothing)".into();
    }
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Finds fio's JSON between the markers and reads it as a [`GuestResult`]: reads and
/// writes summed for ios, IOPS and bandwidth; latency percentiles (fio's `lat_ns`, submit
/// to complete) of the direction with more I/Os.
pub fn parse(console: &str) -> Result<GuestResult, ResultError> {
    let json = console
        .split_once(JSON_BEGIN)
        .and_then(|(_, rest)| rest.split_once(JSON_END))
        // fio prints notes ("note: both iodepth >= 1 and synchronous I/O engine …") on
        // stdout ahead of the JSON.
        .and_then(|(j, _)| j.find('{').map(|i| &j[i..]))
        .ok_or_else(|| ResultError::Missing(last_lines(console, 3)))?;
    let v: Value = serde_json::from_str(json).map_err(ResultError::Json)?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or(ResultError::Field("jobs"))?;
    let side = |k: &'static str| job.get(k).ok_or(ResultError::Field(k));
    let (read, write) = (side("read")?, side("write")?);
    let num = |s: &Value, k: &'static str| {
        s.get(k)
            .and_then(Value::as_f64)
            .ok_or(ResultError::Field(k))
    };
    let ios = num(read, "total_ios")? + num(write, "total_ios")?;
    let iops = num(read, "iops")? + num(write, "iops")?;
    let bw = num(read, "bw_bytes")? + num(write, "bw_bytes")?;
    let main = if num(write, "total_ios")? > num(read, "total_ios")? {
        write
    } else {
        read
    };
    if ios == 0.0 {
        // On the nested PVM host every request is emulated kernel work: a short runtime can
        // end before the first completion (fio then reports no percentiles at all).
        let slat_max = |s: &Value| {
            s.pointer("/slat_ns/max")
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        return Err(ResultError::NoIo {
            runtime_ms: job.get("job_runtime").and_then(Value::as_u64).unwrap_or(0),
            slat_ms: slat_max(read).max(slat_max(write)) / 1_000_000,
        });
    }
    let lat = main.get("lat_ns").ok_or(ResultError::Field("lat_ns"))?;
    let pct = |k: &str| {
        lat.get("percentile")
            .and_then(|p| p.get(k))
            .and_then(Value::as_u64)
            .ok_or(ResultError::Field("lat_ns.percentile"))
    };
    let max = lat
        .get("max")
        .and_then(Value::as_u64)
        .ok_or(ResultError::Field("lat_ns.max"))?;
    let runtime_ms = job
        .get("job_runtime")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Ok(GuestResult {
        ios: ios as u64,
        iops,
        mib_s: bw / (1 << 20) as f64,
        seconds: runtime_ms / 1000.0,
        errors: job.get("error").and_then(Value::as_u64).unwrap_or(0),
        verify: "off".into(),
        lat_ns: [
            pct("50.000000")?,
            pct("90.000000")?,
            pct("99.000000")?,
            pct("99.900000")?,
            max,
        ],
        iops_per_s: Vec::new(),
        irq: None,
        raw: v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(rw: Rw) -> Job {
        Job {
            rw,
            bs: 4096,
            qd: 32,
            queues: 1,
            runtime_s: 3.0,
            ramp_s: 0.5,
            verify: false,
            irq: false,
        }
    }

    #[test]
    fn test_fio_args_carry_every_parameter() {
        let a = fio_args(&job(Rw::RandRead));
        for want in [
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--numjobs=1",
            "--runtime=3000ms",
            "--ramp_time=500ms",
            "--lat_percentiles=1",
        ] {
            assert!(a.split(' ').any(|w| w == want), "{want} missing in {a}");
        }
        assert!(!a.contains("rwmixread"));
        assert!(fio_args(&job(Rw::RandRw)).contains("--rwmixread=50"));
        // The guest's /init reads the quoted form up to the closing quote.
        let c = cmdline(&job(Rw::Read));
        assert!(
            c.starts_with("console=ttyS0 reboot=k fio=\"--rw=read "),
            "{c}"
        );
        assert!(c.ends_with('"') && c.matches('"').count() == 2, "{c}");
    }

    fn side(ios: u64, iops: f64, bw: u64, p50: u64) -> String {
        format!(
            r#"{{"total_ios":{ios},"iops":{iops},"bw_bytes":{bw},"lat_ns":{{"min":1,"max":900000,"mean":2.0,"percentile":{{"50.000000":{p50},"90.000000":{},"99.000000":{},"99.900000":{}}}}}}}"#,
            p50 * 2,
            p50 * 3,
            p50 * 4
        )
    }

    fn console(read: &str, write: &str) -> String {
        format!(
            "ringvm-init: fio exited 0\n{JSON_BEGIN}\n{{\"fio version\":\"fio-3.33\",\"jobs\":[{{\"jobname\":\"ringvm\",\"error\":0,\"job_runtime\":3000,\"read\":{read},\"write\":{write}}}]}}\n{JSON_END}\nringvm-init: fio finished\n"
        )
    }

    #[test]
    fn test_parse_reads_the_busier_direction() {
        let c = console(
            &side(30000, 10000.0, 40_960_000, 50_000),
            &side(0, 0.0, 0, 0),
        );
        let g = parse(&c).unwrap();
        assert_eq!(g.ios, 30000);
        assert_eq!(g.iops, 10000.0);
        assert!((g.mib_s - 39.0625).abs() < 1e-9);
        assert_eq!(g.seconds, 3.0);
        assert_eq!(g.lat_ns, [50_000, 100_000, 150_000, 200_000, 900_000]);
        let c = console(&side(10, 3.0, 4096, 7), &side(20, 6.0, 8192, 11));
        let g = parse(&c).unwrap();
        assert_eq!((g.ios, g.iops), (30, 9.0));
        assert_eq!(g.lat_ns[0], 11, "write side has more I/Os");
    }

    #[test]
    fn test_parse_reads_real_fio_output() {
        // The same options the guest gets, run by the host's fio on a scratch file (the
        // JSON layout is fio's, not this file's guess of it). Skipped where fio is absent.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let j = Job {
            rw: Rw::RandRw,
            bs: 4096,
            qd: 4,
            queues: 1,
            runtime_s: 0.3,
            ramp_s: 0.0,
            verify: false,
            irq: false,
        };
        let mut cmd = std::process::Command::new("fio");
        cmd.args(fio_args(&j).split(' '));
        cmd.args(["--output-format=json", "--ioengine=psync", "--name=ringvm"]);
        cmd.arg(format!("--filename={}", file.display()));
        let Ok(out) = cmd.output() else {
            eprintln!("no fio on this host: skipped");
            return;
        };
        assert!(
            out.status.success(),
            "fio: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let console = format!(
            "{JSON_BEGIN}\n{}\n{JSON_END}\n",
            String::from_utf8_lossy(&out.stdout)
        );
        let g = parse(&console).unwrap();
        assert!(g.ios > 0 && g.iops > 0.0 && g.mib_s > 0.0, "{g:?}");
        let l = g.lat_ns;
        assert!(
            l[0] > 0 && l[0] <= l[1] && l[1] <= l[2] && l[2] <= l[3] && l[3] <= l[4],
            "{l:?}"
        );
    }

    #[test]
    fn test_parse_no_io_says_so() {
        // fio 3.33 in the Linux guest on the PVM host, --runtime=2000ms: the first submit
        // took 2.2 s, so the measured window held no completion (trimmed)
        let c = console(
            r#"{"total_ios":0,"iops":0.0,"bw_bytes":196,"slat_ns":{"min":2155532917,"max":2155532917,"N":1},"lat_ns":{"min":0,"max":0,"mean":0.0,"N":0}}"#,
            r#"{"total_ios":0,"iops":0.0,"bw_bytes":0,"lat_ns":{"min":0,"max":0,"mean":0.0,"N":0}}"#,
        )
        .replace(r#""job_runtime":3000"#, r#""job_runtime":20881"#);
        let e = parse(&c).unwrap_err();
        assert!(
            matches!(
                e,
                ResultError::NoIo {
                    runtime_ms: 20881,
                    slat_ms: 2155
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("lengthen --runtime"), "{e}");
    }

    #[test]
    fn test_parse_without_markers_quotes_the_console() {
        let e = parse("ringvm-init: insmod virtio_blk.ko failed\nKernel panic\n").unwrap_err();
        assert!(e.to_string().contains("Kernel panic"), "{e}");
        let e = parse(&format!("{JSON_BEGIN}\n{{\"jobs\":[]}}\n{JSON_END}\n")).unwrap_err();
        assert!(e.to_string().contains("jobs"), "{e}");
    }
}
