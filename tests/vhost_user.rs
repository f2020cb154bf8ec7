//! ringvm as a vhost-user-blk back end: blkbench under QEMU 10 (`vhost-user-blk-pci`, guest
//! memory in a shared memfd) against `ringvm vhost-user-blk`, on one and two queues; a front
//! end that is killed mid-run and a new one that verifies the data; and hostile messages from
//! a raw socket client, each refused with a logged reason while the back end keeps serving.
//!
//! The QEMU tests skip with a message when QEMU or /dev/kvm is missing, unless
//! RINGVM_REQUIRE_QEMU=1 (scripts/test.sh sets it after installing QEMU).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, have_kvm, ringvm};

/// QEMU runs are heavy on this 2-core lab machine: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const START_TIMEOUT: Duration = Duration::from_secs(20);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// vhost-user request codes (QEMU's docs/interop/vhost-user.rst).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;

fn qemu_available() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok && have_kvm() {
        return true;
    }
    let why = "SKIP: this test needs qemu-system-x86_64 and /dev/kvm (perf/qemu-blkbench.sh installs QEMU 10)";
    assert!(
        std::env::var("RINGVM_REQUIRE_QEMU").as_deref() != Ok("1"),
        "{why}, and RINGVM_REQUIRE_QEMU=1"
    );
    eprintln!("{why}");
    false
}

/// A running `ringvm vhost-user-blk`, stopped with SIGTERM when dropped.
struct BackEnd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl BackEnd {
    /// Serves a new 64 MiB image with `queues` queues on a socket in a fresh directory.
    fn start(queues: u16) -> BackEnd {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let socket = dir.path().join("vu.sock");
        let log = dir.path().join("backend.log");
        let child = ringvm()
            .args(["vhost-user-blk", "--socket"])
            .arg(&socket)
            .arg("--stats-json")
            .arg(dir.path().join("stats.json"))
            .arg("--disk")
            .arg(format!("path={},queues={queues}", img.display()))
            .args(["--io-cores", "1"])
            .env("RINGVM_LOG", "info")
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn ringvm vhost-user-blk");
        let be = BackEnd {
            child,
            socket,
            log,
            _dir: dir,
        };
        let t = Instant::now();
        while UnixStream::connect(&be.socket).is_err() {
            assert!(t.elapsed() < START_TIMEOUT, "no socket: {}", be.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        // That probe was a front end too; let the back end see it go.
        be.wait_log_count("front end disconnected", 1);
        be
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` occurs `n` times in the log.
    fn wait_log_count(&self, needle: &str, n: usize) -> String {
        let t = Instant::now();
        loop {
            let s = self.log_text();
            if s.matches(needle).count() >= n {
                return s;
            }
            assert!(
                t.elapsed() < LOG_TIMEOUT,
                "`{needle}` x{n} never logged:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_alive(&mut self) {
        let log = self.log_text();
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "back end exited: {log}"
        );
        assert!(!log.contains("panicked"), "back end panicked: {log}");
    }

    /// Stops the back end (SIGTERM) and returns its log (with the statistics table) and its
    /// `--stats-json`.
    fn stop(mut self) -> (String, serde_json::Value) {
        // SAFETY: kill(2) on the pid of a child this test owns and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < START_TIMEOUT, "back end ignores SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
        let stats = std::fs::read_to_string(self.log.with_file_name("stats.json"))
            .unwrap_or_else(|e| panic!("no --stats-json ({e}): {}", self.log_text()));
        (self.log_text(), serde_json::from_str(&stats).unwrap())
    }
}

impl Drop for BackEnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs blkbench under QEMU against the back end: (exit status, blkbench's JSON line).
fn qemu_blkbench(be: &BackEnd, params: &str, env: &[(&str, &str)]) -> (i32, Option<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let qlog = be.log.with_extension("qemu.log");
    let out = Command::new(root.join("perf/qemu-blkbench.sh"))
        .args(params.split_whitespace())
        .env("VHOST_SOCK", &be.socket)
        .env("KERNEL", guest("blkbench"))
        .env("LOG", &qlog)
        .env("PIN", "0")
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .output()
        .expect("run perf/qemu-blkbench.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = stdout
        .lines()
        .find(|l| l.starts_with("{\"blkbench\":"))
        .map(str::to_string);
    (out.status.code().unwrap_or(-1), json)
}

/// blkbench's JSON says every I/O completed without error and verified.
fn assert_verified(status: i32, json: Option<String>, ios: u64, what: &str) {
    let json = json.unwrap_or_else(|| panic!("{what}: no result (status {status})"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status, 0, "{what}: {json}");
    assert_eq!(v["ios"].as_u64(), Some(ios), "{what}: {json}");
    assert_eq!(v["errors"].as_u64(), Some(0), "{what}: {json}");
    assert_eq!(v["verify"].as_str(), Some("ok"), "{what}: {json}");
}

fn write_then_read_verified(be: &mut BackEnd, queues: u16, env: &[(&str, &str)]) {
    let p = format!("bs=4k qd=8 queues={queues} ios=2000 size=16m verify=1");
    let (s, j) = qemu_blkbench(be, &format!("rw=randwrite {p}"), env);
    assert_verified(s, j, 2000, &format!("randwrite on {queues} queues"));
    let (s, j) = qemu_blkbench(be, &format!("rw=randread {p}"), env);
    assert_verified(s, j, 2000, &format!("randread on {queues} queues"));
    be.assert_alive();
}

#[test]
fn test_qemu_blkbench_one_queue_write_then_read_verifies() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !qemu_available() {
        return;
    }
    let mut be = BackEnd::start(2);
    write_then_read_verified(&mut be, 1, &[]);
    let (log, stats) = be.stop();
    assert!(log.contains("blk0 queue 0 started"), "{log}");
    assert!(
        !log.contains("queue 1 started"),
        "QEMU used one queue: {log}"
    );
    let q = &stats["queues"];
    let total: u64 = (0..2).filter_map(|i| q[i]["requests"].as_u64()).sum();
    // 2000 writes and 2000 reads, plus blkbench's own GET_ID and probe reads.
    assert!(total >= 4000, "{stats}");
}

/// Free 2 MiB hugepages (scripts/test.sh reserves 512).
fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn test_qemu_blkbench_two_queues_hugetlb_memory_write_then_read_verifies() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !qemu_available() {
        return;
    }
    // QEMU's 256 MiB of guest memory in a hugetlb memfd: 128 pages.
    let huge = free_hugepages() >= 128;
    if !huge {
        eprintln!("NOTE: fewer than 128 free 2 MiB hugepages (scripts/setup-hugepages.sh reserves them); guest memory is a plain memfd");
    }
    let mut be = BackEnd::start(2);
    write_then_read_verified(
        &mut be,
        2,
        &[("VHOST_HUGETLB", if huge { "1" } else { "0" })],
    );
    let (log, stats) = be.stop();
    assert!(log.contains("blk0 queue 1 started"), "{log}");
    if huge {
        assert!(log.contains("MiB (hugetlbfs)"), "{log}");
    }
    // Both queues served reads and writes (the metrics of a queue are merged over its starts).
    for i in [0, 1] {
        let q = stats["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"].as_u64() == Some(i))
            .unwrap_or_else(|| panic!("no queue {i}: {stats}"));
        let (w, r) = (q["writes"].as_u64().unwrap(), q["reads"].as_u64().unwrap());
        assert!(
            w >= 500 && r >= 500,
            "queue {i}: {w} writes, {r} reads: {stats}"
        );
    }
}

#[test]
fn test_qemu_killed_mid_run_then_new_qemu_verifies_on_same_back_end() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !qemu_available() {
        return;
    }
    let mut be = BackEnd::start(2);
    let p = "bs=4k qd=8 queues=2 ios=2000 size=16m verify=1";
    let (s, j) = qemu_blkbench(&be, &format!("rw=randwrite {p}"), &[]);
    assert_verified(s, j, 2000, "first QEMU's randwrite");
    // A second QEMU reads for 60 s but is SIGKILLed after 8: requests in flight, no
    // GET_VRING_BASE, the socket just closes.
    let (s, _) = qemu_blkbench(
        &be,
        "rw=randread bs=4k qd=8 queues=2 runtime=60 size=16m",
        &[("TIMEOUT", "8"), ("TIMEOUT_SIGNAL", "KILL")],
    );
    assert_ne!(s, 0, "the killed QEMU cannot have finished");
    be.wait_log_count("front end disconnected", 3);
    be.assert_alive();
    // A third QEMU finds every block the first one wrote.
    let (s, j) = qemu_blkbench(&be, &format!("rw=randread {p}"), &[]);
    assert_verified(s, j, 2000, "third QEMU's randread after a reconnect");
    be.assert_alive();
}

/// A vhost-user message: header (request, flags = version 1, size) and body.
fn msg(request: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + body.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Sends `data` with `fds` as SCM_RIGHTS in one sendmsg.
fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; the fields used are set below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = space;
    // SAFETY: `mh` points at a control buffer of CMSG_SPACE(fd_bytes) bytes, so the first
    // header and its data fit; the fds are copied into it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
    }
    // SAFETY: `mh` describes valid buffers that outlive the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &mh, 0) };
    assert_eq!(n, data.len() as isize, "sendmsg");
}

/// True once the back end closed the connection (reads end of file or a reset).
fn closed_by_peer(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(LOG_TIMEOUT)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // a reply before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn memfd(len: u64) -> File {
    let f = tempfile::tempfile().unwrap();
    f.set_len(len).unwrap();
    f
}

#[test]
fn test_hostile_messages_are_refused_logged_and_back_end_keeps_serving() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut be = BackEnd::start(2);
    let mem = memfd(1 << 20);
    let regular = memfd(4096);
    let region = |size: u64| {
        let mut b = vec![1u8, 0, 0, 0, 0, 0, 0, 0]; // one region, padding
        b.extend(u64s(&[0, size, 0x7f00_0000_0000, 0]));
        b
    };
    // (what, bytes, fds, reason the back end logs)
    let cases: Vec<(&str, Vec<u8>, Vec<RawFd>, &str)> = vec![
        (
            "garbage",
            b"\xde\xad\xbe\xef garbage!!".to_vec(),
            vec![],
            "closing the connection",
        ),
        (
            "truncated header",
            vec![1, 0, 0, 0, 1, 0],
            vec![],
            "closing the connection",
        ),
        (
            "GET_FEATURES with a file descriptor",
            msg(GET_FEATURES, &[]),
            vec![mem.as_raw_fd()],
            "closing the connection",
        ),
        (
            "SET_MEM_TABLE with one region and two fds",
            msg(SET_MEM_TABLE, &region(1 << 20)),
            vec![mem.as_raw_fd(), mem.as_raw_fd()],
            "closing the connection",
        ),
        (
            "SET_MEM_TABLE with a region past the end of its file",
            msg(SET_MEM_TABLE, &region(64 << 20)),
            vec![mem.as_raw_fd()],
            "refused: SET_MEM_TABLE: Memory region 0 ends at byte 67108864 of its file",
        ),
        (
            "SET_VRING_NUM for queue 7",
            msg(SET_VRING_NUM, &[7, 0, 0, 0, 128, 0, 0, 0]),
            vec![],
            "refused: SET_VRING_NUM for queue 7, but the disk has 2 queues",
        ),
        (
            "GET_VRING_BASE for queue 200",
            msg(GET_VRING_BASE, &[200, 0, 0, 0, 0, 0, 0, 0]),
            vec![],
            "refused: GET_VRING_BASE for queue 200",
        ),
        (
            "SET_VRING_KICK with a regular file",
            msg(SET_VRING_KICK, &u64s(&[0])),
            vec![regular.as_raw_fd()],
            "refused: the kick file descriptor of queue 0 is not an eventfd",
        ),
        (
            "SET_FEATURES with bits never offered",
            msg(SET_FEATURES, &u64s(&[1 << 63])),
            vec![],
            "refused: SET_FEATURES acknowledges bits 0x8000000000000000",
        ),
    ];
    let mut closes = be.log_text().matches("closing the connection").count();
    for (what, bytes, fds, reason) in cases {
        let mut s = UnixStream::connect(&be.socket).unwrap();
        if fds.is_empty() {
            s.write_all(&bytes).unwrap();
        } else {
            send_with_fds(&s, &bytes, &fds);
        }
        if what == "truncated header" {
            // The rest never comes: the back end gives up at its message timeout or when
            // the client hangs up, whichever is first.
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(closed_by_peer(&mut s), "{what}: connection left open");
        closes += 1;
        let log = be.wait_log_count("closing the connection", closes);
        assert!(
            log.contains(reason),
            "{what}: `{reason}` not logged:\n{log}"
        );
        be.assert_alive();
    }
    // The back end still serves a real front end with the same disk.
    if qemu_available() {
        write_then_read_verified(&mut be, 2, &[]);
    }
    let (log, _) = be.stop();
    assert!(!log.contains("panicked"), "{log}");
}
