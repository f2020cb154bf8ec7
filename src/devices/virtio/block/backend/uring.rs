//! Files and block devices through io_uring: O_DIRECT by default, FLUSH as
//! fdatasync, DISCARD as a punched hole, WRITE_ZEROES as a zeroed (or punched) range.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::BackendError;
use crate::devices::virtio::block::request::SECTOR_SHIFT;

/// An open disk image or block device.
#[derive(Debug)]
pub struct UringBackend {
    pub path: PathBuf,
    pub file: Arc<File>,
    /// The same disk without O_DIRECT (only when `direct`): requests whose guest buffers
    /// O_DIRECT refuses (misaligned, or a 4 KiB-sector host disk) go through it.
    pub buffered: Option<Arc<File>>,
    pub capacity_sectors: u64,
    /// Opened with O_DIRECT.
    pub direct: bool,
    pub readonly: bool,
    /// The image's QEMU-compatible locks, released with the backend (when the VM's devices
    /// are dropped), even if an io_uring still holds the file open.
    _lock: Option<super::lock::ImageLock>,
}

pub(super) fn size_of_path(p: &Path) -> Result<u64, BackendError> {
    let mut f = File::open(p).map_err(|source| BackendError::Open {
        path: p.into(),
        source,
    })?;
    // Seeking to the end gives the size of regular files and block devices alike.
    f.seek(SeekFrom::End(0))
        .map_err(|source| BackendError::Size {
            path: p.into(),
            source,
        })
}

/// How to open a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    pub readonly: bool,
    /// O_DIRECT, falling back to buffered I/O where the file system refuses it.
    pub direct: bool,
    /// Take QEMU-compatible image locks (see [`super::lock`]).
    pub lock: bool,
}

fn open_with(p: &Path, readonly: bool, direct: bool) -> std::io::Result<File> {
    let flags = libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 };
    std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(flags)
        .open(p)
}

impl UringBackend {
    /// Opens `p` read-write (or read-only), with O_DIRECT when `direct`; where the file
    /// system refuses O_DIRECT (EINVAL, e.g. older tmpfs) it falls back to buffered I/O
    /// with a one-line notice. With `lock`, the image is locked as QEMU locks it before
    /// anything else is done with it; the lock lives as long as the backend.
    pub fn open(p: &Path, opts: OpenOptions) -> Result<UringBackend, BackendError> {
        let OpenOptions {
            readonly,
            direct,
            lock,
        } = opts;
        let (file, direct) = match open_with(p, readonly, direct) {
            Ok(f) => (f, direct),
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: O_DIRECT is not supported there, using buffered I/O",
                    p.display()
                );
                (
                    open_with(p, readonly, false).map_err(|source| BackendError::Open {
                        path: p.into(),
                        source,
                    })?,
                    false,
                )
            }
            Err(source) => {
                return Err(BackendError::Open {
                    path: p.into(),
                    source,
                })
            }
        };
        let file = Arc::new(file);
        let image_lock = if lock {
            super::lock::ImageLock::take(file.clone(), p, readonly)?
        } else {
            None
        };
        let bytes = (&*file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BackendError::Size {
                path: p.into(),
                source,
            })?;
        if bytes < 512 {
            return Err(BackendError::Empty { path: p.into() });
        }
        if bytes % 512 != 0 {
            log::warn!(
                "{}: size {bytes} is not a multiple of 512, the last {} bytes are not visible",
                p.display(),
                bytes % 512
            );
        }
        let buffered = if direct {
            let f = open_with(p, readonly, false).map_err(|source| BackendError::Open {
                path: p.into(),
                source,
            })?;
            Some(Arc::new(f))
        } else {
            None
        };
        Ok(UringBackend {
            path: p.into(),
            file,
            buffered,
            capacity_sectors: bytes >> SECTOR_SHIFT,
            direct,
            readonly,
            _lock: image_lock,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The buffered twin of [`fd`](Self::fd), if the disk is opened with O_DIRECT.
    pub fn buffered_fd(&self) -> Option<RawFd> {
        self.buffered.as_ref().map(|f| f.as_raw_fd())
    }
}

/// Builds a queue's SQEs against its fixed-file slot. Lives on the reactor.
#[derive(Debug)]
pub struct QueueIo {
    fixed: types::Fixed,
    /// The buffered twin, when `fixed` is opened with O_DIRECT.
    alt: Option<types::Fixed>,
    /// Keeps the files open as long as the queue may submit to them.
    _files: (Arc<File>, Option<Arc<File>>),
    /// FALLOC_FL_ZERO_RANGE works here (cleared after the first EOPNOTSUPP, e.g. on tmpfs).
    pub zero_range: bool,
}

impl QueueIo {
    pub fn new(fixed: u32, file: Arc<File>, alt: Option<(u32, Arc<File>)>) -> Self {
        let (alt_fixed, alt_file) = match alt {
            Some((i, f)) => (Some(types::Fixed(i)), Some(f)),
            None => (None, None),
        };
        QueueIo {
            fixed: types::Fixed(fixed),
            alt: alt_fixed,
            _files: (file, alt_file),
            zero_range: true,
        }
    }

    /// True when a buffered twin exists for requests O_DIRECT refuses.
    pub fn has_buffered(&self) -> bool {
        self.alt.is_some()
    }

    fn target(&self, buffered: bool) -> types::Fixed {
        match (buffered, self.alt) {
            (true, Some(a)) => a,
            _ => self.fixed,
        }
    }

    /// `readv`/`writev` (`write`) over `n` iovecs at `iov`, through the buffered twin when
    /// `buffered`.
    pub fn rw_vectored(
        &self,
        write: bool,
        iov: *const libc::iovec,
        n: usize,
        offset: u64,
        buffered: bool,
    ) -> squeue::Entry {
        let fd = self.target(buffered);
        if write {
            opcode::Writev::new(fd, iov, n as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, iov, n as u32).offset(offset).build()
        }
    }

    /// READ_FIXED/WRITE_FIXED of one buffer inside registered fixed buffer `buf`.
    pub fn rw_fixed(
        &self,
        write: bool,
        v: &libc::iovec,
        buf: u16,
        offset: u64,
        buffered: bool,
    ) -> squeue::Entry {
        let fd = self.target(buffered);
        let (ptr, len) = (v.iov_base.cast::<u8>(), v.iov_len as u32);
        if write {
            opcode::WriteFixed::new(fd, ptr, len, buf)
                .offset(offset)
                .build()
        } else {
            opcode::ReadFixed::new(fd, ptr, len, buf)
                .offset(offset)
                .build()
        }
    }

    /// fdatasync.
    pub fn flush(&self) -> squeue::Entry {
        opcode::Fsync::new(self.fixed)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
    }

    /// Deallocates the range; reads return zeros afterwards. Works on files and block devices.
    pub fn punch(&self, offset: u64, len: u64) -> squeue::Entry {
        opcode::Fallocate::new(self.fixed, len)
            .offset(offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build()
    }

    /// Zeroes the range: ZERO_RANGE, or a punched hole when `unmap` is allowed or ZERO_RANGE
    /// is not supported.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> squeue::Entry {
        if unmap || !self.zero_range {
            return self.punch(offset, len);
        }
        opcode::Fallocate::new(self.fixed, len)
            .offset(offset)
            .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    fn opts(readonly: bool, lock: bool) -> OpenOptions {
        OpenOptions {
            readonly,
            direct: false,
            lock,
        }
    }

    #[test]
    fn test_open_same_image_twice_writable_second_refused() {
        let img = image();
        let _a = UringBackend::open(img.path(), opts(false, true)).unwrap();
        let b = UringBackend::open(img.path(), opts(false, true));
        assert!(matches!(b, Err(BackendError::Locked { .. })), "{b:?}");
    }

    #[test]
    fn test_open_lock_off_second_writer_allowed() {
        let img = image();
        let _a = UringBackend::open(img.path(), opts(false, true)).unwrap();
        UringBackend::open(img.path(), opts(false, false)).unwrap();
    }

    #[test]
    fn test_open_two_readonly_both_allowed() {
        let img = image();
        let _a = UringBackend::open(img.path(), opts(true, true)).unwrap();
        UringBackend::open(img.path(), opts(true, true)).unwrap();
    }

    #[test]
    fn test_open_lock_released_on_drop_next_writer_allowed() {
        let img = image();
        drop(UringBackend::open(img.path(), opts(false, true)).unwrap());
        UringBackend::open(img.path(), opts(false, true)).unwrap();
    }
}
