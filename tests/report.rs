//! The HTML latency report, opened in headless Chromium: rendered from a fixture through
//! `ringvm report`, and end to end from `ringvm bench --report` (which needs /dev/kvm).
//! Also `--hlog` with the guest's histogram next to the host's, from `bench` and `run`.
//!
//! Chromium is Debian's `chromium` (scripts/setup-test-deps.sh installs it). Without it the
//! Chromium checks are skipped with a message, unless RINGVM_REQUIRE_CHROMIUM=1
//! (scripts/test.sh sets it), which makes a missing Chromium a failure.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/report-series.json"
);

fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if std::env::var("RINGVM_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("chromium is missing and RINGVM_REQUIRE_CHROMIUM=1: run scripts/setup-test-deps.sh (apt-get install chromium)");
    }
    eprintln!(
        "SKIP: chromium is not installed (apt-get install chromium, or scripts/setup-test-deps.sh)"
    );
    None
}

/// Runs headless Chromium on `html` with one extra mode argument; returns stdout.
fn headless(bin: &Path, html: &Path, mode: &[&str]) -> Vec<u8> {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .arg("120")
        .arg(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode)
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("spawn chromium");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Decoded PNG: width, height, RGB(A) pixels as RGB triples.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut w, mut h, mut channels) = (0u32, 0u32, 0usize);
    let mut idat = Vec::new();
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap());
                h = u32::from_be_bytes(data[4..8].try_into().unwrap());
                assert_eq!(data[8], 8, "bit depth");
                assert_eq!(data[12], 0, "interlaced PNG");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    t => panic!("PNG colour type {t} not handled"),
                };
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(idat.as_slice())
        .read_to_end(&mut raw)
        .unwrap();
    let stride = w as usize * channels;
    assert_eq!(raw.len(), (stride + 1) * h as usize, "PNG data size");
    let mut prev = vec![0u8; stride];
    let mut pixels = Vec::with_capacity((w * h) as usize);
    for row in raw.chunks(stride + 1) {
        let (filter, src) = (row[0], &row[1..]);
        let mut cur = vec![0u8; stride];
        for i in 0..stride {
            let a = if i >= channels { cur[i - channels] } else { 0 };
            let b = prev[i];
            let c = if i >= channels { prev[i - channels] } else { 0 };
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((a as u16 + b as u16) / 2) as u8,
                4 => {
                    let p = a as i16 + b as i16 - c as i16;
                    let (pa, pb, pc) = (
                        (p - a as i16).abs(),
                        (p - b as i16).abs(),
                        (p - c as i16).abs(),
                    );
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("PNG filter {f}"),
            };
            cur[i] = src[i].wrapping_add(pred);
        }
        pixels.extend(cur.chunks(channels).map(|p| [p[0], p[1], p[2]]));
        prev = cur;
    }
    (w, h, pixels)
}

fn hex(c: &str) -> [u8; 3] {
    let v = u32::from_str_radix(c.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

/// Screenshots `html` and checks the picture is not blank and shows `colors` (legend
/// swatches and bars are solid), and that the DOM holds every text of `legends`.
fn check_in_chromium(bin: &Path, html: &Path, legends: &[&str], colors: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("report.png");
    headless(
        bin,
        html,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1200,2000",
        ],
    );
    if let Some(keep) = std::env::var_os("RINGVM_KEEP_REPORT_PNG") {
        std::fs::copy(&png, Path::new(&keep).join(png.file_name().unwrap())).unwrap();
    }
    let (w, h, pixels) = decode_png(&std::fs::read(&png).unwrap());
    assert_eq!((w, h), (1200, 2000));
    let distinct: HashSet<[u8; 3]> = pixels.iter().copied().collect();
    assert!(
        distinct.len() > 50,
        "screenshot looks blank: {} colours",
        distinct.len()
    );
    let white = pixels.iter().filter(|p| **p == [255, 255, 255]).count();
    assert!(
        white < pixels.len() * 99 / 100,
        "screenshot is almost all white"
    );
    for c in colors {
        let n = pixels.iter().filter(|p| **p == hex(c)).count();
        assert!(n >= 100, "colour {c} shows on only {n} pixels");
    }
    let dom = String::from_utf8_lossy(&headless(bin, html, &["--dump-dom"])).into_owned();
    assert_eq!(dom.matches("class=\"legend\"").count(), 3, "three legends");
    for l in legends {
        assert!(dom.contains(l), "legend text {l:?} missing from the DOM");
    }
}

#[test]
fn test_report_fixture_renders_in_chromium_with_legends() {
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("fixture.html");
    let r = common::run(&[
        "report",
        "--input",
        FIXTURE,
        "--output",
        html.to_str().unwrap(),
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(
        !text.contains("<script") && !text.contains("http"),
        "self-contained"
    );
    let Some(bin) = chromium() else { return };
    check_in_chromium(
        &bin,
        &html,
        &[
            ">ringvm</text>",
            ">qemu &lt;iothread&gt; &amp; \"aio\"</text>",
            ">fio</text>",
            ">host service (pop → complete)</text>",
            ">99.99%</text>",
        ],
        &[
            ringvm::report::svg::PALETTE[0],
            ringvm::report::svg::PALETTE[1],
            ringvm::report::svg::PALETTE[2],
        ],
    );
}

#[test]
fn test_report_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.json");
    std::fs::write(&input, r#"{"series":[{"name":"a","hist":"x"}]}"#).unwrap();
    let out = dir.path().join("out.html");
    let r = common::run(&[
        "report",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("series[0].hist"), "{}", r.stderr);
    assert!(!out.exists());
    let r = common::run(&[
        "report",
        "--input",
        "/nonexistent.json",
        "--output",
        "/tmp/x.html",
    ]);
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains("Cannot read /nonexistent.json"),
        "{}",
        r.stderr
    );
}

/// (tag, sample count) of every interval in an HdrHistogram log; fails if it does not parse.
fn hlog_counts(path: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read(path).unwrap();
    IntervalLogIterator::new(&text)
        .filter_map(|e| match e.expect("interval log parses") {
            LogEntry::Interval(i) => {
                let bytes = base64_decode(i.encoded_histogram());
                let h: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .expect("histogram decodes");
                Some((
                    i.tag().map(|t| t.as_str().to_string()).unwrap_or_default(),
                    h.len(),
                ))
            }
            _ => None,
        })
        .collect()
}

fn base64_decode(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = acc << 6 | T.iter().position(|&t| t == c).expect("base64") as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn test_bench_report_and_hlog_show_guest_next_to_host() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (html, hlog, json) = (
        dir.path().join("bench.html"),
        dir.path().join("bench.hlog"),
        dir.path().join("bench.json"),
    );
    let args = [
        "bench",
        "--runtime",
        "1.2",
        "--rw",
        "randread",
        "--qd",
        "1",
        "--disk-size",
        "64M",
        "--report",
        html.to_str().unwrap(),
        "--hlog",
        hlog.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    // Another bench on this machine (a peer's test run) holds the cores for a few seconds.
    let mut r = common::run(&args);
    for _ in 0..10 {
        if !r.stderr.contains("already pinned") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
        r = common::run(&args);
    }
    assert_eq!(r.status, 0, "stdout: {} stderr: {}", r.stdout, r.stderr);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let job = &j["jobs"][0];
    let ios = job["guest"]["ios"].as_u64().unwrap();
    assert_eq!(
        job["iops_per_s"].as_array().map(Vec::len),
        Some(1),
        "one whole second in a 1.2 s run: {}",
        job["iops_per_s"]
    );
    let counts = hlog_counts(&hlog);
    let guest: Vec<u64> = counts
        .iter()
        .filter(|(t, _)| t == "guest")
        .map(|c| c.1)
        .collect();
    assert_eq!(
        guest,
        vec![ios],
        "guest interval holds every measured I/O: {counts:?}"
    );
    let k2c = counts
        .iter()
        .find(|(t, _)| t == "blk0-q0-k2c")
        .expect("host interval");
    assert!(k2c.1 >= ios, "host counts the ramp too: {counts:?}");
    let Some(bin) = chromium() else { return };
    check_in_chromium(
        &bin,
        &html,
        &[
            ">4k randread qd1</text>",
            ">host service (pop → complete)</text>",
        ],
        &[ringvm::report::svg::PALETTE[0]],
    );
}

#[test]
fn test_run_hlog_with_blkbench_adds_guest_interval() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let hlog = dir.path().join("run.hlog");
    let spec = format!("path={}", img.display());
    let r = common::run(&[
        "run",
        "--kernel",
        common::guest("blkbench").to_str().unwrap(),
        "--memory",
        "256M",
        "--disk",
        &spec,
        "--cmdline",
        "rw=randread ios=1500 qd=4",
        "--hlog",
        hlog.to_str().unwrap(),
    ]);
    assert_eq!(r.status, 1, "blkbench exits 0: {} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("{\"blkbench\":"),
        "console still reaches stdout"
    );
    let counts = hlog_counts(&hlog);
    assert!(counts.contains(&("guest".to_string(), 1500)), "{counts:?}");
    assert!(
        counts.iter().any(|(t, n)| t == "blk0-q0-k2c" && *n >= 1500),
        "{counts:?}"
    );
}
