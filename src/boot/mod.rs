//! Loading a guest kernel and building what it reads at entry: PVH ELFs (the benchmark
//! guest and kernels with a PVH note) and Linux bzImage/vmlinux through the 64-bit boot
//! protocol.

pub mod acpi;
pub mod e820;
pub mod linux;
pub mod mptable;
pub mod pvh;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, ReadVolatile};

use crate::devices::virtio::GuestMemory;
use crate::vmm::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIGH_MEMORY_START, MMIO_HOLE_START};
use crate::vmm::vcpu::EntryPoint;

/// Errors from loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open initrd {path}")]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Kernel {path} is neither a PVH ELF nor a Linux kernel (bzImage or vmlinux)")]
    UnknownFormat { path: PathBuf },
    #[error("Kernel {path} is a corrupt or unsupported image: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("Initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("Kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("Failed to write {what} into guest memory")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("Failed to build boot parameters: {0}")]
    Params(String),
}

/// Where a kernel comes from: a file, or an ELF embedded in the ringvm binary (its own
/// bare-metal guests), which is loaded straight from memory and never written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    File(PathBuf),
    Embedded {
        name: &'static str,
        elf: &'static [u8],
    },
}

impl KernelImage {
    /// How messages name it: the file's path, or `<embedded NAME>`.
    pub fn display_path(&self) -> PathBuf {
        match self {
            KernelImage::File(p) => p.clone(),
            KernelImage::Embedded { name, .. } => PathBuf::from(format!("<embedded {name}>")),
        }
    }
}

impl From<PathBuf> for KernelImage {
    fn from(p: PathBuf) -> Self {
        KernelImage::File(p)
    }
}

/// What the VMM asks the loader to put into the guest.
pub struct BootSpec<'a> {
    pub kernel: &'a KernelImage,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub vcpus: u8,
    /// Running on the nested PVM host: Linux kernels get the parameters its emulator needs.
    pub pvm_quirks: bool,
    /// The vCPUs' TSC rate. On the PVM host the guest's CPUID comes from the L1 host, not
    /// ringvm's table (which carries the rate in leaf 0x40000010), so a PVH guest that is
    /// not Linux (ringvm's bare-metal guests) gets it as `tsc_khz=` on its command line.
    pub tsc_khz: Option<u32>,
    /// The 64-bit PCI BAR window (start, size) the DSDT reports, with `--pci-bars high`.
    pub pci_mmio64: Option<(u64, u64)>,
}

/// Kernel parameters a Linux guest gets on the PVM host, each unless the command line
/// already sets it. The host's ring-0 emulator cannot run `xrstor` (noxsave), and the
/// guest kernel reads the L1 host's CPUID in ring 0, so ringvm's CPUID masks do not reach it:
/// `clearcpuid=` hides what the emulator refuses (smap → clac/stac, popcnt) or what costs an
/// emulated exit per use (see perf/RESULTS.md, Linux guests, for how each was found).
pub const PVM_LINUX_PARAMS: &[&str] = &[
    "noxsave",
    "clearcpuid=smap,popcnt,rdtscp,fsgsbase,rdpid,serialize,invpcid,pcid,ssse3,erms,fsrm,sse4_1,sse4_2,aes,pclmulqdq,114",
    "mitigations=off",
    "cryptomgr.notests",
    "init_on_alloc=0",
    "nmi_watchdog=0",
    "tsc=reliable",
    // The watchdog reports every 28 s during the minutes-long ftrace check; each report
    // costs about a second of emulated serial output.
    "nosoftlockup",
    // SMP guests (see pvm_smp_params, which adds `nopv` for them): PV spinlock kicks are
    // KVM hypercalls, which panic the guest here; and emulated CPUs look stalled to RCU,
    // whose stall dump kicked (perf/RESULTS.md, run H).
    "nopvspin",
    "rcupdate.rcu_cpu_stall_suppress=1",
];

/// What a Linux guest with more than one vCPU also needs on the PVM host: `nopv`, because
/// its paravirtual IPIs, spinlock kicks and sched-yields are KVM hypercalls, which this
/// host's emulator answers by rewriting the instruction in read-only kernel text (the guest
/// panics); and, since `nopv` also drops kvm-clock and this host's CPUID has no TSC-rate
/// leaf, `tsc_early_khz=` with the vCPUs' TSC rate (perf/RESULTS.md, runs H and K).
fn pvm_smp_params(vcpus: u8, tsc_khz: Option<u32>) -> Vec<String> {
    if vcpus < 2 {
        return Vec::new();
    }
    let mut p = vec!["nopv".to_string()];
    if let Some(khz) = tsc_khz {
        p.push(format!("tsc_early_khz={khz}"));
    }
    p
}

/// `cmdline` with each of `params` appended whose key it does not set already.
fn with_params(cmdline: &str, params: &[&str]) -> String {
    let key = |w: &str| w.split('=').next().unwrap_or("").to_string();
    let present: Vec<String> = cmdline.split_whitespace().map(key).collect();
    let mut out = cmdline.trim().to_string();
    for p in params.iter().filter(|p| !present.contains(&key(p))) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(p);
    }
    out
}

/// Where the initrd landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub addr: GuestAddress,
    pub size: u64,
}

enum Format {
    Elf,
    BzImage,
}

fn detect<R: Read + Seek>(file: &mut R) -> std::io::Result<Option<Format>> {
    let mut head = [0u8; 0x210];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut head)?;
    if n >= 4 && &head[..4] == b"\x7fELF" {
        return Ok(Some(Format::Elf));
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

/// Loads the kernel, initrd and command line into `mem` and writes the boot structures.
pub fn load(mem: &GuestMemory, spec: &BootSpec) -> Result<EntryPoint, BootError> {
    match spec.kernel {
        KernelImage::File(path) => {
            let kernel = File::open(path).map_err(|source| BootError::OpenKernel {
                path: path.clone(),
                source,
            })?;
            load_from(mem, spec, kernel, path.clone())
        }
        KernelImage::Embedded { elf, .. } => {
            load_from(mem, spec, Cursor::new(*elf), spec.kernel.display_path())
        }
    }
}

/// [`load`] from an open kernel image that messages call `kpath`.
fn load_from<R: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    spec: &BootSpec,
    mut kernel: R,
    kpath: PathBuf,
) -> Result<EntryPoint, BootError> {
    let format = detect(&mut kernel)
        .map_err(|source| BootError::OpenKernel {
            path: kpath.clone(),
            source,
        })?
        .ok_or_else(|| BootError::UnknownFormat {
            path: kpath.clone(),
        })?;
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let result: KernelLoaderResult = match format {
        Format::Elf => Elf::load(mem, None, &mut kernel, highmem),
        Format::BzImage => BzImage::load(mem, None, &mut kernel, highmem),
    }
    .map_err(|e| BootError::Load {
        path: kpath.clone(),
        reason: e.to_string(),
    })?;

    let is_linux = match format {
        Format::BzImage => true,
        Format::Elf => has_linux_note(&mut kernel).unwrap_or(false),
    };
    let cmdline = match (spec.pvm_quirks, is_linux, spec.tsc_khz) {
        (true, true, tsc_khz) => {
            let smp = pvm_smp_params(spec.vcpus, tsc_khz);
            let params: Vec<&str> = PVM_LINUX_PARAMS
                .iter()
                .copied()
                .chain(smp.iter().map(String::as_str))
                .collect();
            let c = with_params(spec.cmdline, &params);
            log::warn!(
                "nested PVM host: Linux command line is now '{c}' (see README, Linux guests)"
            );
            c
        }
        (true, false, Some(khz)) => with_params(spec.cmdline, &[&format!("tsc_khz={khz}")]),
        _ => spec.cmdline.to_string(),
    };
    let spec = &BootSpec {
        cmdline: &cmdline,
        ..*spec
    };
    write_cmdline(mem, spec.cmdline)?;
    // Every guest gets ACPI tables (Linux finds its CPUs there); bare-metal guests ignore them.
    let rsdp = acpi::write(mem, spec.vcpus, spec.pci_mmio64)?;
    let initrd = match spec.initrd {
        Some(path) => Some(load_initrd(mem, path, result.kernel_end, spec.mem_size)?),
        None => None,
    };
    match (format, result.pvh_boot_cap) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            let start_info = pvh::write_start_info(mem, spec.mem_size, rsdp, initrd)?;
            Ok(EntryPoint::Pvh {
                entry: entry.raw_value(),
                start_info,
            })
        }
        (Format::Elf, _) => {
            // A vmlinux without a PVH note: enter startup_64 with boot_params.
            let mut elf_head = [0u8; 32];
            kernel
                .seek(SeekFrom::Start(0))
                .and_then(|_| kernel.read_exact(&mut elf_head))
                .map_err(|source| BootError::OpenKernel {
                    path: kpath.clone(),
                    source,
                })?;
            let entry = u64::from_le_bytes(elf_head[24..32].try_into().expect("8 bytes"));
            let zero_page = linux::write_boot_params(mem, None, spec, initrd, rsdp)?;
            mptable::write(mem, spec.vcpus)?;
            Ok(EntryPoint::Linux64 { entry, zero_page })
        }
        (Format::BzImage, _) => {
            let zero_page = linux::write_boot_params(mem, result.setup_header, spec, initrd, rsdp)?;
            mptable::write(mem, spec.vcpus)?;
            // The 64-bit entry point of a bzImage is 0x200 past its protected-mode start.
            Ok(EntryPoint::Linux64 {
                entry: result.kernel_load.raw_value() + 0x200,
                zero_page,
            })
        }
    }
}

/// Whether an ELF carries a note owned by "Linux" (a vmlinux), read from its PT_NOTE
/// segments with every offset and size bounded.
fn has_linux_note<R: Read + Seek>(f: &mut R) -> std::io::Result<bool> {
    const PT_NOTE: u32 = 4;
    const MAX_NOTES: u64 = 64 << 10;
    let mut eh = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut eh)?;
    let phoff = u64::from_le_bytes(eh[32..40].try_into().expect("8 bytes"));
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as u64;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as u64;
    if phentsize < 56 {
        return Ok(false);
    }
    for i in 0..phnum.min(64) {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff.saturating_add(i * phentsize)))?;
        f.read_exact(&mut ph)?;
        if u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes")) != PT_NOTE {
            continue;
        }
        let off = u64::from_le_bytes(ph[8..16].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(ph[32..40].try_into().expect("8 bytes")).min(MAX_NOTES);
        let mut notes = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut notes)?;
        let mut p = 0usize;
        while p + 12 <= notes.len() {
            let namesz = u32::from_le_bytes(notes[p..p + 4].try_into().expect("4 bytes")) as usize;
            let descsz =
                u32::from_le_bytes(notes[p + 4..p + 8].try_into().expect("4 bytes")) as usize;
            let name = notes.get(p + 12..p + 12 + namesz).unwrap_or(&[]);
            if name.starts_with(b"Linux") {
                return Ok(true);
            }
            p = p + 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    Ok(false)
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::Memory {
            what: "command line",
            source,
        })
}

/// Puts the initrd at the top of low RAM, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
) -> Result<Initrd, BootError> {
    let pb = path.to_path_buf();
    let mut f = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: pb.clone(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| BootError::OpenInitrd {
            path: pb.clone(),
            source,
        })?
        .len();
    let limit = mem_size.min(MMIO_HOLE_START);
    let floor = kernel_end.max(HIGH_MEMORY_START);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= floor);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooBig {
            path: pb,
            size,
            limit,
        });
    };
    let mut data = Vec::with_capacity(size as usize);
    f.read_to_end(&mut data)
        .map_err(|source| BootError::OpenInitrd {
            path: pb.clone(),
            source,
        })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|source| BootError::Memory {
            what: "initrd",
            source,
        })?;
    Ok(Initrd {
        addr: GuestAddress(addr),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    /// One vCPU, 32 MiB, no initrd or command line: enough to load (or refuse) a kernel.
    fn plain(kernel: &KernelImage) -> BootSpec<'_> {
        BootSpec {
            kernel,
            initrd: None,
            cmdline: "",
            mem_size: 32 << 20,
            vcpus: 1,
            pvm_quirks: false,
            tsc_khz: None,
            pci_mmio64: None,
        }
    }

    #[test]
    fn test_load_garbage_file_unknown_format() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x55; 4096]).unwrap();
        let kernel = KernelImage::File(f.path().into());
        let spec = plain(&kernel);
        let err = load(&mem(), &spec).unwrap_err();
        assert!(
            err.to_string()
                .contains("neither a PVH ELF nor a Linux kernel"),
            "{err}"
        );
    }

    #[test]
    fn test_load_truncated_elf_is_corrupt() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF\x02\x01\x01\0").unwrap();
        let kernel = KernelImage::File(f.path().into());
        let spec = plain(&kernel);
        let err = load(&mem(), &spec).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn test_load_missing_kernel_names_path() {
        let kernel = KernelImage::File("/nonexistent/vmlinuz".into());
        let spec = plain(&kernel);
        let err = load(&mem(), &spec).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
    }

    #[test]
    fn test_load_embedded_guest_from_memory_pvh_entry() {
        let kernel = KernelImage::Embedded {
            name: "hello",
            elf: crate::guests::HELLO,
        };
        let spec = plain(&kernel);
        let entry = load(&mem(), &spec).unwrap();
        assert!(matches!(entry, EntryPoint::Pvh { .. }), "{entry:?}");
    }

    #[test]
    fn test_load_corrupt_embedded_image_names_it() {
        let kernel = KernelImage::Embedded {
            name: "broken",
            elf: b"\x7fELF\x02\x01\x01\0",
        };
        let spec = plain(&kernel);
        let err = load(&mem(), &spec).unwrap_err().to_string();
        assert!(err.contains("<embedded broken>"), "{err}");
    }

    fn elf_with_note(owner: &[u8]) -> tempfile::NamedTempFile {
        let mut b = vec![0u8; 120];
        b[..4].copy_from_slice(b"\x7fELF");
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut note = Vec::new();
        note.extend_from_slice(&(owner.len() as u32 + 1).to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&1u32.to_le_bytes());
        note.extend_from_slice(owner);
        note.push(0);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        note.extend_from_slice(&[1, 2, 3, 4]);
        b[64..68].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        b[72..80].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        b[96..104].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
        b.extend_from_slice(&note);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&b).unwrap();
        f
    }

    #[test]
    fn test_pvm_params_added_unless_already_set() {
        let c = with_params(
            "console=ttyS0 mitigations=auto",
            &["noxsave", "mitigations=off"],
        );
        assert_eq!(c, "console=ttyS0 mitigations=auto noxsave");
        assert_eq!(with_params("", &["noxsave"]), "noxsave");
    }

    #[test]
    fn test_pvm_smp_params_only_for_several_vcpus() {
        assert!(pvm_smp_params(1, Some(2_596_096)).is_empty());
        assert_eq!(
            pvm_smp_params(2, Some(2_596_096)),
            vec!["nopv", "tsc_early_khz=2596096"]
        );
        assert_eq!(pvm_smp_params(4, None), vec!["nopv"]);
    }

    #[test]
    fn test_linux_note_detected_only_for_linux_owner() {
        let mut linux = elf_with_note(b"Linux").reopen().unwrap();
        assert!(has_linux_note(&mut linux).unwrap());
        let mut xen = elf_with_note(b"Xen").reopen().unwrap();
        assert!(!has_linux_note(&mut xen).unwrap());
    }

    #[test]
    fn test_initrd_too_big_rejected() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file_mut().set_len(40 << 20).unwrap();
        let err = load_initrd(&mem(), f.path(), 2 << 20, 32 << 20).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn test_initrd_placed_page_aligned_at_top() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        let i = load_initrd(&mem(), f.path(), 2 << 20, 32 << 20).unwrap();
        assert_eq!(i.addr.raw_value() % 4096, 0);
        assert!(i.addr.raw_value() + i.size <= 32 << 20);
        let b: u8 = mem().read_obj(i.addr).unwrap_or(0);
        let _ = b;
    }
}
