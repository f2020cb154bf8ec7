//! Disk options (`--disk path=IMG,queues=4,...`) and the virtio-blk configuration space.

use std::path::PathBuf;
use std::str::FromStr;

use crate::devices::virtio::{parse_index_list, split_options};

/// Which back end serves the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// A file or block device through io_uring.
    #[default]
    Uring,
    /// Completes every request without I/O (measures the VMM's own cost).
    Null,
}

/// Longest serial number (`id=`) virtio-blk can return (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
/// Largest queue size of a split virtqueue.
pub const QUEUE_SIZE_MAX: u16 = 32768;
/// Most queues one disk may have.
pub const QUEUES_MAX: u16 = 64;

/// A disk as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file or block device (may be omitted with `backend=null`).
    pub path: Option<PathBuf>,
    pub queues: u16,
    pub queue_size: u16,
    /// Reactor index for each queue, round-robin over this list (default: round-robin over
    /// the whole pool).
    pub reactors: Option<Vec<usize>>,
    pub readonly: bool,
    /// O_DIRECT (default on; falls back to buffered where unsupported).
    pub direct: bool,
    pub backend: BackendKind,
    /// Busy-poll the avail rings this long after activity, µs (0: off).
    pub poll_us: u32,
    /// Serial number returned by GET_ID (at most 20 bytes).
    pub id: Option<String>,
    /// Capacity in bytes for `backend=null` (`size=`, suffixes K, M, G, T).
    pub size: Option<u64>,
    /// Lock the image as QEMU does (`lock=on|off`, default on; see `backend::lock`).
    pub lock: bool,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            path: None,
            queues: 1,
            queue_size: 256,
            reactors: None,
            readonly: false,
            direct: true,
            backend: BackendKind::Uring,
            poll_us: 32,
            id: None,
            size: None,
            lock: true,
        }
    }
}

/// Errors in a disk option string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskConfigError {
    #[error("Unknown disk option `{0}` (expected path, queues, queue-size, reactors, readonly, direct, backend, poll-us, id, size, lock)")]
    UnknownKey(String),
    #[error("Invalid value `{value}` for disk option `{key}`: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("Disk option `{0}` given twice")]
    Duplicate(String),
    #[error("A disk needs `path=` (only `backend=null` may omit it)")]
    MissingPath,
    #[error("A null disk without `path=` needs `size=`")]
    MissingSize,
}

fn bad(key: &str, value: &str, reason: &str) -> DiskConfigError {
    DiskConfigError::BadValue {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn parse_on_off(key: &str, value: &str) -> Result<bool, DiskConfigError> {
    match value {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(bad(key, value, "expected on or off")),
    }
}

fn parse_size(key: &str, value: &str) -> Result<u64, DiskConfigError> {
    let (num, mult) = match value.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad(key, value, "unknown suffix (use K, M, G or T)")),
            };
            (&value[..i], m)
        }
        _ => (value, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| bad(key, value, "expected a size such as 512M"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| bad(key, value, "too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(bad(key, value, "must be a non-zero multiple of 512 bytes"));
    }
    Ok(bytes)
}

impl FromStr for DiskConfig {
    type Err = DiskConfigError;

    /// Parses `path=IMG,queues=4,queue-size=256[,reactors=1,2][,readonly][,direct=on|off]`
    /// `[,backend=uring|null][,poll-us=N][,id=SERIAL][,size=1G][,lock=on|off]`. A bare number after
    /// `reactors=` continues its list (`reactors=0,1,queues=2`); `:` also separates its items.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut c = DiskConfig::default();
        let options = split_options(s, "reactors").map_err(DiskConfigError::Duplicate)?;
        for (key, value) in &options {
            let (key, value) = (*key, value.as_str());
            match key {
                "path" => {
                    if value.is_empty() {
                        return Err(bad(key, value, "empty path"));
                    }
                    c.path = Some(PathBuf::from(value));
                }
                "queues" | "num-queues" => {
                    let n: u16 = value
                        .parse()
                        .map_err(|_| bad(key, value, "expected a number"))?;
                    if n == 0 || n > QUEUES_MAX {
                        return Err(bad(key, value, &format!("must be 1 to {QUEUES_MAX}")));
                    }
                    c.queues = n;
                }
                "queue-size" => {
                    let n: u16 = value
                        .parse()
                        .map_err(|_| bad(key, value, "expected a number"))?;
                    if !(2..=QUEUE_SIZE_MAX).contains(&n) || !n.is_power_of_two() {
                        return Err(bad(
                            key,
                            value,
                            &format!("must be a power of two from 2 to {QUEUE_SIZE_MAX}"),
                        ));
                    }
                    c.queue_size = n;
                }
                "reactors" => {
                    let list = parse_index_list(value)
                        .ok_or_else(|| bad(key, value, "expected reactor indices such as 0,1"))?;
                    c.reactors = Some(list);
                }
                "readonly" | "ro" => {
                    c.readonly = if value.is_empty() {
                        true
                    } else {
                        parse_on_off(key, value)?
                    }
                }
                "direct" => c.direct = parse_on_off(key, value)?,
                "lock" | "locking" => c.lock = parse_on_off(key, value)?,
                "backend" => {
                    c.backend = match value {
                        "uring" | "io_uring" => BackendKind::Uring,
                        "null" => BackendKind::Null,
                        _ => return Err(bad(key, value, "expected uring or null")),
                    }
                }
                "poll-us" => {
                    let n: u32 = value
                        .parse()
                        .map_err(|_| bad(key, value, "expected microseconds"))?;
                    if n > 1_000_000 {
                        return Err(bad(key, value, "at most 1000000 (1 s)"));
                    }
                    c.poll_us = n;
                }
                "id" | "serial" => {
                    if value.len() > ID_BYTES || value.is_empty() {
                        return Err(bad(key, value, &format!("must be 1 to {ID_BYTES} bytes")));
                    }
                    c.id = Some(value.to_string());
                }
                "size" => c.size = Some(parse_size(key, value)?),
                _ => return Err(DiskConfigError::UnknownKey(key.into())),
            }
        }
        match (c.backend, &c.path, c.size) {
            (BackendKind::Uring, None, _) => return Err(DiskConfigError::MissingPath),
            (BackendKind::Null, None, None) => return Err(DiskConfigError::MissingSize),
            _ => {}
        }
        Ok(c)
    }
}

/// virtio-blk feature bits (virtio 1.2, 5.2.3), as masks of `virtio_bindings`' bit numbers.
pub mod features {
    use virtio_bindings::virtio_blk::*;

    pub const SIZE_MAX: u64 = 1 << VIRTIO_BLK_F_SIZE_MAX;
    pub const SEG_MAX: u64 = 1 << VIRTIO_BLK_F_SEG_MAX;
    pub const GEOMETRY: u64 = 1 << VIRTIO_BLK_F_GEOMETRY;
    pub const RO: u64 = 1 << VIRTIO_BLK_F_RO;
    pub const BLK_SIZE: u64 = 1 << VIRTIO_BLK_F_BLK_SIZE;
    pub const FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;
    pub const TOPOLOGY: u64 = 1 << VIRTIO_BLK_F_TOPOLOGY;
    pub const CONFIG_WCE: u64 = 1 << VIRTIO_BLK_F_CONFIG_WCE;
    pub const MQ: u64 = 1 << VIRTIO_BLK_F_MQ;
    pub const DISCARD: u64 = 1 << VIRTIO_BLK_F_DISCARD;
    pub const WRITE_ZEROES: u64 = 1 << VIRTIO_BLK_F_WRITE_ZEROES;
}

/// Size of the configuration space we expose (through `write_zeroes_may_unmap` and padding).
pub const CONFIG_LEN: usize = 60;
/// Largest single data segment we announce (`size_max`).
pub const SIZE_MAX_BYTES: u32 = 1 << 20;
/// Largest DISCARD / WRITE_ZEROES request, in 512-byte sectors.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
/// DISCARD granularity, in 512-byte sectors (4 KiB).
pub const DISCARD_ALIGN_SECTORS: u32 = 8;

/// What the parser and the device need to know about a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub capacity_sectors: u64,
    pub readonly: bool,
    /// Data segments per request we accept (`seg_max`).
    pub seg_max: u32,
    pub discard_align_sectors: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// Serial number, zero-padded.
    pub id: [u8; ID_BYTES],
}

impl DiskInfo {
    pub fn new(capacity_sectors: u64, readonly: bool, queue_size: u16, id: &str) -> Self {
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        DiskInfo {
            capacity_sectors,
            readonly,
            // Header and status take two descriptors; indirect chains may be longer than the
            // queue, but 1022 keeps every request within IOV_MAX.
            seg_max: (u32::from(queue_size).saturating_sub(2)).clamp(1, 1022),
            discard_align_sectors: DISCARD_ALIGN_SECTORS,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            id: idb,
        }
    }

    /// The configuration space (virtio 1.2, 5.2.4), little endian.
    pub fn config_space(&self, num_queues: u16) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX_BYTES.to_le_bytes());
        c[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // geometry (16..20) stays zero: we do not offer VIRTIO_BLK_F_GEOMETRY.
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        // topology: physical_block_exp 3 (4 KiB), alignment_offset 0, min_io_size 1 (in
        // logical blocks), opt_io_size 0 (none).
        c[24] = 3;
        c[25] = 0;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        c[28..32].copy_from_slice(&0u32.to_le_bytes());
        c[32] = 1; // writeback: the driver must FLUSH
        c[34..36].copy_from_slice(&num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&self.discard_align_sectors.to_le_bytes());
        c[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_full_option_string_sets_every_field() {
        let c: DiskConfig =
            "path=/img,queues=4,queue-size=128,reactors=1,2,readonly,direct=off,poll-us=50,id=abc"
                .parse()
                .unwrap();
        assert_eq!(c.path.as_deref(), Some(std::path::Path::new("/img")));
        assert_eq!((c.queues, c.queue_size, c.poll_us), (4, 128, 50));
        assert_eq!(c.reactors, Some(vec![1, 2]));
        assert!(c.readonly && !c.direct);
        assert_eq!(c.id.as_deref(), Some("abc"));
        assert_eq!(c.backend, BackendKind::Uring);
        assert!(c.lock, "locking is on by default");
    }

    #[test]
    fn test_parse_lock_off_and_on_sets_lock() {
        let off: DiskConfig = "path=/img,lock=off".parse().unwrap();
        assert!(!off.lock);
        let on: DiskConfig = "path=/img,lock=on".parse().unwrap();
        assert!(on.lock);
        assert!(matches!(
            "path=/img,lock=sometimes".parse::<DiskConfig>(),
            Err(DiskConfigError::BadValue { key, .. }) if key == "lock"
        ));
    }

    #[test]
    fn test_parse_reactors_colon_list_and_null_size_ok() {
        let c: DiskConfig = "backend=null,size=1G,reactors=0:1:0".parse().unwrap();
        assert_eq!(c.reactors, Some(vec![0, 1, 0]));
        assert_eq!(c.size, Some(1 << 30));
        assert!(c.path.is_none());
    }

    #[test]
    fn test_parse_bad_inputs_name_key_and_value() {
        let cases = [
            ("path=/a,queues=0", "queues", "0"),
            ("path=/a,queue-size=100", "queue-size", "100"),
            ("path=/a,direct=maybe", "direct", "maybe"),
            ("path=/a,backend=spdk", "backend", "spdk"),
            (
                "path=/a,id=012345678901234567890",
                "id",
                "012345678901234567890",
            ),
            ("backend=null,size=1X", "size", "1X"),
            ("path=/a,reactors=x", "reactors", "x"),
        ];
        for (s, key, value) in cases {
            match s.parse::<DiskConfig>() {
                Err(DiskConfigError::BadValue {
                    key: k, value: v, ..
                }) => assert_eq!((k.as_str(), v.as_str()), (key, value), "{s}"),
                other => panic!("{s}: {other:?}"),
            }
        }
        assert_eq!(
            "path=/a,colour=red".parse::<DiskConfig>(),
            Err(DiskConfigError::UnknownKey("colour".into()))
        );
        assert_eq!(
            "queues=2".parse::<DiskConfig>(),
            Err(DiskConfigError::MissingPath)
        );
        assert_eq!(
            "backend=null".parse::<DiskConfig>(),
            Err(DiskConfigError::MissingSize)
        );
        assert_eq!(
            "path=/a,path=/b".parse::<DiskConfig>(),
            Err(DiskConfigError::Duplicate("path".into()))
        );
        let msg = "path=/a,queues=x"
            .parse::<DiskConfig>()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`queues`") && msg.contains("`x`"), "{msg}");
    }

    #[test]
    fn test_config_space_layout_matches_spec_offsets() {
        let d = DiskInfo::new(2048, false, 256, "x");
        let c = d.config_space(4);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(c[44..48].try_into().unwrap()),
            DISCARD_ALIGN_SECTORS
        );
        assert_eq!(c[56], 1);
    }
}
