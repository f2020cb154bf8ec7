//! The back end's fallbacks for operations a file refuses, so that the queue handler only
//! asks "is there a retry?" and never knows why:
//! - WRITE_ZEROES without unmap that fails with EOPNOTSUPP: the file system has no
//!   FALLOC_FL_ZERO_RANGE (tmpfs); punch a hole instead, for this request and every later one.
//! - a read or write that O_DIRECT refuses with EINVAL (e.g. a host disk with 4 KiB
//!   sectors): retried once through the buffered twin of the file.

use io_uring::squeue;

use super::QueueIo;
use crate::devices::virtio::block::request::{Request, RequestType, SECTOR_SHIFT};

/// A retry of a refused operation.
pub struct Retry {
    pub entry: squeue::Entry,
    /// The retry goes through the page cache (the request's slot must remember it, so that
    /// it is not retried again).
    pub buffered: bool,
}

impl QueueIo {
    /// The retry for `req`, whose operation completed with `res`, if the back end has one.
    /// `iov` is the request's iovec array (still owned by its slot); `buffered` says whether
    /// the failed operation already went through the buffered twin.
    pub fn retry(
        &mut self,
        req: &Request,
        iov: *const libc::iovec,
        buffered: bool,
        res: i32,
    ) -> Option<Retry> {
        let len = u64::from(req.num_sectors) << SECTOR_SHIFT;
        match req.kind {
            RequestType::WriteZeroes
                if res == -libc::EOPNOTSUPP && !req.unmap && self.zero_range =>
            {
                self.zero_range = false;
                Some(Retry {
                    entry: self.write_zeroes(req.offset(), len, true),
                    buffered,
                })
            }
            RequestType::In | RequestType::Out
                if res == -libc::EINVAL && !buffered && self.has_buffered() =>
            {
                let write = req.kind == RequestType::Out;
                Some(Retry {
                    entry: self.rw_vectored(write, iov, req.niov, req.offset(), true),
                    buffered: true,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::sync::Arc;

    use vm_memory::GuestAddress;

    use super::*;

    fn req(kind: RequestType, unmap: bool) -> Request {
        Request {
            kind,
            sector: 8,
            data_len: 4096,
            niov: 1,
            status: GuestAddress(0),
            num_sectors: 8,
            unmap,
            unaligned: false,
        }
    }

    fn io(twin: bool) -> QueueIo {
        let f = Arc::new(File::open("/dev/null").unwrap());
        QueueIo::new(0, f.clone(), twin.then_some((1, f)))
    }

    /// What `io` retries `kind` (unmap, already buffered) failing with `res` as: `None`,
    /// or whether the retry goes buffered.
    fn retried(
        io: &mut QueueIo,
        kind: RequestType,
        unmap: bool,
        buffered: bool,
        res: i32,
    ) -> Option<bool> {
        io.retry(&req(kind, unmap), std::ptr::null(), buffered, res)
            .map(|r| r.buffered)
    }

    #[test]
    fn test_retry_write_zeroes_eopnotsupp_punches_once_then_always() {
        let mut io = io(false);
        let eopnotsupp = -libc::EOPNOTSUPP;
        assert_eq!(
            retried(&mut io, RequestType::WriteZeroes, false, false, eopnotsupp),
            Some(false)
        );
        assert!(
            !io.zero_range,
            "later WRITE_ZEROES punch holes from the start"
        );
        assert_eq!(
            retried(&mut io, RequestType::WriteZeroes, false, false, eopnotsupp),
            None
        );
        assert_eq!(
            retried(&mut io, RequestType::WriteZeroes, true, false, eopnotsupp),
            None
        );
    }

    #[test]
    fn test_retry_einval_goes_buffered_once_and_only_with_a_twin() {
        let mut twin = io(true);
        let einval = -libc::EINVAL;
        for kind in [RequestType::In, RequestType::Out] {
            assert_eq!(retried(&mut twin, kind, false, false, einval), Some(true));
            assert_eq!(retried(&mut twin, kind, false, true, einval), None);
        }
        assert_eq!(
            retried(&mut io(false), RequestType::In, false, false, einval),
            None
        );
        assert_eq!(
            retried(&mut twin, RequestType::Flush, false, false, einval),
            None
        );
        assert_eq!(
            retried(&mut twin, RequestType::In, false, false, -libc::EIO),
            None
        );
    }
}
