//! The tap back end: one `/dev/net/tun` file per queue pair, with the virtio-net header in
//! front of every frame (IFF_VNET_HDR, 12 bytes: `virtio_net_hdr_v1`).
//!
//! The files are O_NONBLOCK: tun supports IOCB_NOWAIT, so io_uring arms an internal poll for
//! a read with no packet waiting instead of blocking a worker thread, and the read completes
//! when a packet arrives (or is cancelled at reset).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of the virtio-net header the tap puts in front of each frame (virtio 1.2 5.1.6:
/// `virtio_net_hdr` with `num_buffers`, as VERSION_1 requires).
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";
const IFNAMSIZ: usize = 16;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

// _IOW('T', 202, int), _IOW('T', 208, unsigned int), _IOW('T', 216, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// TUNSETQUEUE (`_IOW('T', 217, int)`): attaches or detaches one queue of a multi-queue tap.
pub const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
/// SIOCSIFMTU: a socket ioctl (the tun file does not take it).
const SIOCSIFMTU: libc::c_ulong = 0x8922;
const SIOCGIFMTU: libc::c_ulong = 0x8921;

/// Offloads the tap may hand to us (TUNSETOFFLOAD, `TUN_F_*`).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("Invalid tap name `{0}` (1 to 15 bytes, no NUL)")]
    BadName(String),
    #[error("Cannot open {TUN_PATH} for tap `{name}`")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open or create tap `{name}`{hint}")]
    SetIff {
        name: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Cannot set the virtio-net header size on tap `{name}`")]
    VnetHdr {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot set MTU {mtu} on tap `{name}`{hint}")]
    Mtu {
        name: String,
        mtu: u16,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Cannot duplicate the file of queue pair {pair} of tap `{name}`")]
    Dup {
        name: String,
        pair: usize,
        #[source]
        source: io::Error,
    },
    #[error("Cannot {} queue {pair} of tap `{name}`", if *attach { "attach" } else { "detach" })]
    Steer {
        name: String,
        pair: u16,
        attach: bool,
        #[source]
        source: io::Error,
    },
    #[error("Cannot set offloads {flags:#x} on tap `{name}`")]
    Offload {
        name: String,
        flags: u32,
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct ifreq` with `ifr_mtu`.
#[repr(C)]
struct IfReqMtu {
    name: [u8; IFNAMSIZ],
    mtu: libc::c_int,
    _pad: [u8; 20],
}

/// An open tap device: one file per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    fds: Vec<OwnedFd>,
    /// `TUN_F_*` offloads the kernel accepted when probed.
    supported: u32,
}

impl Tap {
    /// Opens tap `name` (creating it if it does not exist) with `queues` files. Needs
    /// CAP_NET_ADMIN unless the tap exists and belongs to the caller.
    pub fn open(name: &str, queues: u16) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.into()));
        }
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut fds = Vec::with_capacity(usize::from(queues.max(1)));
        // A single-queue open of a tap created multi_queue (as scripts/net/ and libvirt do)
        // fails with EINVAL: open that tap the way it was made.
        let first = match open_one(name, flags) {
            Err(TapError::SetIff { source, .. })
                if queues <= 1 && source.raw_os_error() == Some(libc::EINVAL) =>
            {
                flags |= IFF_MULTI_QUEUE;
                open_one(name, flags)?
            }
            other => other?,
        };
        fds.push(first);
        for _ in 1..queues.max(1) {
            fds.push(open_one(name, flags)?);
        }
        let mut tap = Tap {
            name: name.into(),
            fds,
            supported: 0,
        };
        tap.supported = tap.probe_offloads();
        Ok(tap)
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file of queue pair `pair`.
    pub fn fd(&self, pair: usize) -> RawFd {
        self.fds[pair].as_raw_fd()
    }

    /// A second descriptor for the file of queue pair `pair` (the same tap queue).
    pub fn dup_queue(&self, pair: usize) -> Result<OwnedFd, TapError> {
        self.fds[pair].try_clone().map_err(|source| TapError::Dup {
            name: self.name.clone(),
            pair,
            source,
        })
    }

    /// Number of queue pairs (files).
    pub fn pairs(&self) -> usize {
        self.fds.len()
    }

    /// Sets the interface's MTU (SIOCSIFMTU), so the host side of the link carries the frames
    /// the guest is told it may send (VIRTIO_NET_F_MTU). Done once at start-up.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let fail = |source: io::Error| {
            let hint = match source.raw_os_error() {
                Some(libc::EINVAL) => " (outside the range the tap takes, 68 to 65521)",
                Some(libc::EPERM) => " (setting an MTU needs CAP_NET_ADMIN)",
                _ => "",
            };
            TapError::Mtu {
                name: self.name.clone(),
                mtu,
                hint,
                source,
            }
        };
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        // SAFETY: `s` was just created and is owned by nothing else.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReqMtu {
            name: [0; IFNAMSIZ],
            mtu: libc::c_int::from(mtu),
            _pad: [0; 20],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCSIFMTU reads a `struct ifreq` (40 bytes, laid out by `IfReqMtu`) through
        // a pointer that is valid for the call.
        if unsafe { libc::ioctl(s.as_raw_fd(), SIOCSIFMTU, &mut req as *mut IfReqMtu) } < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The interface's MTU now (SIOCGIFMTU), `None` when it cannot be read. Read once at
    /// start-up (it opens a socket): it sizes the RX reads (`rx::RxQueue::with_frame_max`).
    pub fn mtu(&self) -> Option<u32> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return None;
        }
        // SAFETY: `s` was just created and is owned by nothing else.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReqMtu {
            name: [0; IFNAMSIZ],
            mtu: 0,
            _pad: [0; 20],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFMTU writes a `struct ifreq` (40 bytes, laid out by `IfReqMtu`)
        // through a pointer that is valid for the call.
        if unsafe { libc::ioctl(s.as_raw_fd(), SIOCGIFMTU, &mut req as *mut IfReqMtu) } < 0 {
            return None;
        }
        u32::try_from(req.mtu).ok()
    }

    /// `TUN_F_*` offloads this kernel accepts on the tap.
    pub fn supported_offloads(&self) -> u32 {
        self.supported
    }

    /// Tells the tap which offloads the guest can take (TUNSETOFFLOAD applies to the device,
    /// so one file is enough).
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is ours and open.
        let r = unsafe {
            libc::ioctl(
                self.fds[0].as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn probe_offloads(&self) -> u32 {
        let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;
        let mut ok = 0;
        for f in [all, all & !TUN_F_UFO, TUN_F_CSUM] {
            if self.set_offloads(f).is_ok() {
                ok = f;
                break;
            }
        }
        // Nothing until the guest says what it takes.
        let _ = self.set_offloads(0);
        ok
    }
}

/// Attaches (or detaches) the tap queue of file `fd` (TUNSETQUEUE): a detached queue gets
/// no frames, and the kernel spreads flows over the attached ones only.
pub fn set_queue_attached(fd: RawFd, attach: bool) -> io::Result<()> {
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: if attach {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        },
        _pad: [0; 22],
    };
    // SAFETY: TUNSETQUEUE reads a `struct ifreq` (laid out by `IfReq`) through a pointer
    // valid for the call; on a descriptor that is not a tap queue it fails with an error.
    if unsafe { libc::ioctl(fd, TUNSETQUEUE, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_one(name: &str, flags: libc::c_short) -> Result<OwnedFd, TapError> {
    let path = CString::new(TUN_PATH).expect("constant path has no NUL");
    // SAFETY: `path` is a valid C string; the returned fd is checked below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(TapError::OpenTun {
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (40 bytes).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::EPERM) => " (creating or attaching a tap needs CAP_NET_ADMIN)",
            Some(libc::EBUSY) => {
                " (it is in use, or exists with other flags, e.g. without multi_queue)"
            }
            Some(libc::EINVAL) => {
                " (it exists with other flags, e.g. not a tap or without vnet_hdr)"
            }
            _ => "",
        };
        return Err(TapError::SetIff {
            name: name.into(),
            hint,
            source,
        });
    }
    let hdr = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr as *const libc::c_int) } < 0 {
        return Err(TapError::VnetHdr {
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_open_bad_name_fails_naming_it() {
        let e = Tap::open("this-name-is-too-long", 1).unwrap_err();
        assert!(e.to_string().contains("this-name-is-too-long"), "{e}");
    }

    #[test]
    fn test_open_non_tap_interface_fails_naming_it() {
        // `lo` exists and is no tap: TUNSETIFF refuses it (EINVAL, or EPERM without
        // CAP_NET_ADMIN); either way the error names the interface.
        let e = Tap::open("lo", 1).unwrap_err();
        let msg = crate::error::error_chain(&e);
        assert!(msg.contains("tap `lo`"), "{msg}");
    }

    #[test]
    fn test_ifreq_has_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<IfReqMtu>(), 40);
    }

    /// A fresh tap of this test process (removed when the Tap drops); None: SKIP printed.
    fn fresh_tap(tag: &str) -> Option<Tap> {
        let name = format!("rvm{tag}{}", std::process::id() % 100_000);
        match Tap::open(&name, 1) {
            Ok(t) => Some(t),
            Err(e) => {
                let msg = crate::error::error_chain(&e);
                eprintln!("SKIP: cannot create tap {name}: {msg}");
                None
            }
        }
    }

    fn sysfs_mtu(name: &str) -> u32 {
        std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn test_set_mtu_reaches_the_interface() {
        let Some(tap) = fresh_tap("m") else { return };
        let before = sysfs_mtu(tap.name());
        let want = if before == 9000 { 4000 } else { 9000 };
        tap.set_mtu(want).unwrap();
        assert_eq!(sysfs_mtu(tap.name()), u32::from(want));
    }

    #[test]
    fn test_set_mtu_refused_by_host_names_tap() {
        let Some(tap) = fresh_tap("r") else { return };
        let before = sysfs_mtu(tap.name());
        // Above a tap's maximum (65535 less the Ethernet header): the kernel says EINVAL.
        let e = tap.set_mtu(u16::MAX).unwrap_err();
        let msg = crate::error::error_chain(&e);
        assert!(
            msg.contains(&format!("MTU 65535 on tap `{}`", tap.name())),
            "{msg}"
        );
        assert_eq!(
            sysfs_mtu(tap.name()),
            before,
            "a refused MTU changes nothing"
        );
    }
}
