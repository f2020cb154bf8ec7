//! Image locking that interoperates with QEMU's (`block/file-posix.c`, `locking=on`).
//!
//! QEMU gives each block permission a byte: "consistent read" 0, "write" 1, "write
//! unchanged" 2, "resize" 3. A user holding a permission takes a shared OFD lock
//! (`F_OFD_SETLK`, `F_RDLCK`) on byte 100 + bit; a user that does *not* share a permission
//! with others takes one on byte 200 + bit. It then tests (`F_OFD_GETLK` with `F_WRLCK`)
//! byte 200 + bit of every permission it wants (someone refuses to share it) and byte
//! 100 + bit of every permission it refuses to share (someone holds it). Only shared locks
//! are ever taken, so the check is what refuses; the locks belong to the open file
//! description, so a second open of the same image in the same process conflicts too, and
//! the kernel drops them when the last descriptor closes, however the process ends.
//!
//! ringvm takes what QEMU's virtio-blk takes, and refuses to share resizing as well (a
//! disk's capacity is read once at start-up):
//!
//! | disk     | holds (100+)           | does not share (200+) |
//! |----------|------------------------|-----------------------|
//! | writable | consistent read, write | write, resize         |
//! | readonly | consistent read        | write, resize         |
//!
//! So two writers refuse each other, a reader and a writer refuse each other, and any
//! number of readers share the image, with ringvm and QEMU alike.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::BackendError;

/// First byte of the "holds permission" range (QEMU's RAW_LOCK_PERM_BASE).
pub const PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" range (QEMU's RAW_LOCK_SHARED_BASE).
pub const SHARED_BASE: i64 = 200;

/// QEMU's block permissions, by bit number (BLK_PERM_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Perm {
    /// The name QEMU prints for it ("Failed to get \"write\" lock").
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }
}

/// Why the lock was refused: a permission we want that someone does not share, or a
/// permission someone holds that we do not share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Byte 200 + perm is locked: another user does not share `perm`, which we need.
    Unshared(Perm),
    /// Byte 100 + perm is locked: another user holds `perm`, which we do not share.
    Held(Perm),
}

impl Conflict {
    fn byte(self) -> i64 {
        match self {
            Conflict::Unshared(p) => SHARED_BASE + p as i64,
            Conflict::Held(p) => PERM_BASE + p as i64,
        }
    }
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // QEMU's wording, so a user who met one of them recognises the other.
        match self {
            Conflict::Unshared(p) => write!(f, "failed to get \"{}\" lock", p.name()),
            Conflict::Held(p) => write!(f, "failed to get shared \"{}\" lock", p.name()),
        }
    }
}

/// Who holds a conflicting lock, as far as /proc tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Not found (another user's process, or /proc unreadable).
    Unknown,
    /// Another open of the image in this very process.
    ThisProcess,
    Process {
        pid: u32,
        comm: String,
    },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Unknown => f.write_str("another process"),
            Holder::ThisProcess => f.write_str("this ringvm (is the image given twice?)"),
            Holder::Process { pid, comm } => write!(f, "{comm} (pid {pid})"),
        }
    }
}

/// What a writable or a readonly disk holds and refuses to share.
fn scheme(readonly: bool) -> (&'static [Perm], &'static [Perm]) {
    const UNSHARED: &[Perm] = &[Perm::Write, Perm::Resize];
    if readonly {
        (&[Perm::ConsistentRead], UNSHARED)
    } else {
        (&[Perm::ConsistentRead, Perm::Write], UNSHARED)
    }
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; every field the kernel reads is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_shared(fd: RawFd, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: F_OFD_SETLK reads the flock struct we pass; `fd` is open for the call.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether anyone but this open file description holds a lock on `byte`.
fn is_locked(fd: RawFd, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass; `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Releases every lock byte of `fd`'s open file description.
fn unlock_all(fd: RawFd) {
    let mut fl = flock(libc::F_UNLCK as libc::c_short, PERM_BASE);
    fl.l_len = SHARED_BASE + 4 - PERM_BASE;
    // SAFETY: F_OFD_SETLK reads the flock struct we pass; `fd` is open for the call.
    unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
}

/// The image's locks, released when this is dropped (with the disk's back end, when the
/// VM's devices go), not when the last reference to the open file goes: an io_uring
/// fixed-file table keeps the file open until the kernel tears the ring down, after its
/// owner has gone, and the next VM of a `ringvm bench` must find the image free.
#[derive(Debug)]
pub struct ImageLock {
    file: std::sync::Arc<File>,
}

impl ImageLock {
    /// Locks `file` (see [`lock_image`]); `None` when the file system has no OFD locks.
    pub fn take(
        file: std::sync::Arc<File>,
        path: &Path,
        readonly: bool,
    ) -> Result<Option<ImageLock>, BackendError> {
        if !lock_image(&file, path, readonly)? {
            return Ok(None);
        }
        Ok(Some(ImageLock { file }))
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        unlock_all(self.file.as_raw_fd());
    }
}

/// Errors from the kernel meaning "this file system has no OFD locks" (QEMU's
/// `locking=auto` then runs unlocked too).
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Takes QEMU-compatible locks on `file` (the image at `path`) for a writable or readonly
/// disk. Refuses with [`BackendError::Locked`] when another user's permissions conflict
/// (releasing what it took). Returns false when the file system has no OFD locks.
pub fn lock_image(file: &File, path: &Path, readonly: bool) -> Result<bool, BackendError> {
    let fd = file.as_raw_fd();
    let (held, unshared) = scheme(readonly);
    let io_err = |source| BackendError::Lock {
        path: path.into(),
        source,
    };
    let bytes = held
        .iter()
        .map(|p| PERM_BASE + *p as i64)
        .chain(unshared.iter().map(|p| SHARED_BASE + *p as i64));
    for byte in bytes {
        match set_shared(fd, byte) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                log::warn!(
                    "{}: the file system has no OFD locks ({e}), so the image is not locked against other users",
                    path.display()
                );
                unlock_all(fd);
                return Ok(false);
            }
            Err(e) => {
                unlock_all(fd);
                return Err(io_err(e));
            }
        }
    }
    let wanted = held.iter().map(|p| Conflict::Unshared(*p));
    let refused = unshared.iter().map(|p| Conflict::Held(*p));
    for conflict in wanted.chain(refused) {
        let locked = is_locked(fd, conflict.byte()).map_err(|e| {
            unlock_all(fd);
            io_err(e)
        })?;
        if locked {
            let holder = find_holder(file, conflict.byte());
            unlock_all(fd);
            return Err(BackendError::Locked {
                path: path.into(),
                conflict,
                holder,
            });
        }
    }
    Ok(true)
}

/// The process with another open of `file`'s inode that holds a lock covering `byte`,
/// found through /proc/PID/fdinfo's `lock:` lines (OFD locks carry no pid). Only on the
/// error path; processes we may not inspect are skipped.
fn find_holder(file: &File, byte: i64) -> Holder {
    let Ok(meta) = file.metadata() else {
        return Holder::Unknown;
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let own_pid = std::process::id();
    let own_fd = file.as_raw_fd();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Holder::Unknown;
    };
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd_entry in fds.flatten() {
            let name = fd_entry.file_name();
            let Some(n) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == own_pid && n == own_fd {
                continue;
            }
            let same_inode = std::fs::metadata(fd_entry.path())
                .map(|m| m.dev() == dev && m.ino() == ino)
                .unwrap_or(false);
            if !same_inode {
                continue;
            }
            let info = std::fs::read_to_string(proc_entry.path().join("fdinfo").join(&name))
                .unwrap_or_default();
            if !fdinfo_locks(&info).any(|(start, end)| start <= byte && byte <= end) {
                continue;
            }
            if pid == own_pid {
                return Holder::ThisProcess;
            }
            let comm = std::fs::read_to_string(proc_entry.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "process".into());
            return Holder::Process { pid, comm };
        }
    }
    Holder::Unknown
}

/// The byte ranges of the `lock:` lines in a /proc/PID/fdinfo/FD text
/// (`lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:123 101 101`; the end may be `EOF`).
fn fdinfo_locks(info: &str) -> impl Iterator<Item = (i64, i64)> + '_ {
    info.lines()
        .filter(|l| l.starts_with("lock:"))
        .filter_map(|l| {
            let mut w = l.split_whitespace().rev();
            let end = w.next()?;
            let start = w.next()?.parse().ok()?;
            let end = if end == "EOF" {
                i64::MAX
            } else {
                end.parse().ok()?
            };
            Some((start, end))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    /// A second open file description of the image, as a second user would have.
    fn open(f: &tempfile::NamedTempFile) -> File {
        File::options()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap()
    }

    fn lock(f: &tempfile::NamedTempFile, readonly: bool) -> (File, Result<(), BackendError>) {
        let file = open(f);
        let r = lock_image(&file, f.path(), readonly).map(|_| ());
        (file, r)
    }

    #[test]
    fn test_lock_two_writers_second_refused_naming_image_and_holder() {
        let img = image();
        let (_a, ra) = lock(&img, false);
        ra.unwrap();
        let (_b, rb) = lock(&img, false);
        match rb {
            Err(BackendError::Locked {
                path,
                conflict,
                holder,
            }) => {
                assert_eq!(path, img.path());
                assert_eq!(conflict, Conflict::Unshared(Perm::Write));
                assert_eq!(holder, Holder::ThisProcess);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_lock_two_readers_both_ok() {
        let img = image();
        let (_a, ra) = lock(&img, true);
        let (_b, rb) = lock(&img, true);
        ra.unwrap();
        rb.unwrap();
    }

    #[test]
    fn test_lock_writer_then_reader_refused() {
        let img = image();
        let (_a, ra) = lock(&img, false);
        ra.unwrap();
        let (_b, rb) = lock(&img, true);
        assert!(
            matches!(
                rb,
                Err(BackendError::Locked {
                    conflict: Conflict::Held(Perm::Write),
                    ..
                })
            ),
            "{rb:?}"
        );
    }

    #[test]
    fn test_lock_reader_then_writer_refused() {
        let img = image();
        let (_a, ra) = lock(&img, true);
        ra.unwrap();
        let (_b, rb) = lock(&img, false);
        assert!(
            matches!(
                rb,
                Err(BackendError::Locked {
                    conflict: Conflict::Unshared(Perm::Write),
                    ..
                })
            ),
            "{rb:?}"
        );
    }

    #[test]
    fn test_lock_released_when_file_closed_next_writer_ok() {
        let img = image();
        let (a, ra) = lock(&img, false);
        ra.unwrap();
        drop(a);
        let (_b, rb) = lock(&img, false);
        rb.unwrap();
    }

    #[test]
    fn test_lock_takes_qemu_bytes() {
        let img = image();
        let (a, ra) = lock(&img, false);
        ra.unwrap();
        let probe = open(&img);
        let locked: Vec<i64> = (PERM_BASE..PERM_BASE + 4)
            .chain(SHARED_BASE..SHARED_BASE + 4)
            .filter(|b| is_locked(probe.as_raw_fd(), *b).unwrap())
            .collect();
        assert_eq!(locked, vec![100, 101, 201, 203]);
        // A lock of our own never counts as a conflict.
        assert!(!is_locked(a.as_raw_fd(), 101).unwrap());
    }

    #[test]
    fn test_locked_error_is_one_line_naming_path() {
        let img = image();
        let (_a, _) = lock(&img, false);
        let (_b, rb) = lock(&img, false);
        let msg = rb.unwrap_err().to_string();
        assert!(msg.contains(&img.path().display().to_string()), "{msg}");
        assert!(msg.contains("\"write\""), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn test_fdinfo_locks_parses_ranges_and_eof() {
        let info = "pos:\t0\nflags:\t02\nlock:\t1: OFDLCK ADVISORY  READ -1 fe:00:12 101 101\n\
                    lock:\t2: POSIX  ADVISORY  WRITE 42 fe:00:12 0 EOF\n";
        let v: Vec<_> = fdinfo_locks(info).collect();
        assert_eq!(v, vec![(101, 101), (0, i64::MAX)]);
    }
}
