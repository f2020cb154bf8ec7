//! Validated configuration: every check with a clear message happens here, before any
//! resource is created.

use std::path::PathBuf;

use crate::boot::mptable::MAX_VCPUS;
use crate::boot::KernelImage;
use crate::cli::{RunArgs, VmArgs};
use crate::devices::virtio::block::{DiskConfig, DiskConfigError};
use crate::devices::virtio::net::{NetConfig, NetConfigError};
use crate::seccomp::SeccompMode;
use crate::vmm::memory::HugePages;

/// Errors in the user's configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("Invalid size '{0}': expected a number with an optional K, M, G or T suffix")]
    Size(String),
    #[error("Invalid memory size {size}: {reason}")]
    Memory { size: String, reason: String },
    #[error("Invalid --vcpus {0}: at least 1")]
    NoVcpus(u32),
    #[error("--vcpus {asked} is more than KVM allows ({max})")]
    TooManyVcpus { asked: u32, max: usize },
    #[error("{what} names core {core}, but this machine has cores 0-{last}")]
    NoSuchCore {
        what: &'static str,
        core: usize,
        last: usize,
    },
    #[error("--vcpu-affinity lists {given} cores for {vcpus} vCPUs")]
    AffinityCount { given: usize, vcpus: u32 },
    #[error("{0}")]
    HugePages(String),
    #[error(
        "--memory-merge cannot merge --hugepages {0} memory (KSM merges only 4 KiB and \
         transparent huge pages): use --hugepages none or thp"
    )]
    MergeHugetlb(String),
    #[error("Invalid --serial '{0}': expected stdio, file:PATH or none")]
    Serial(String),
    #[error("Invalid --cpu-features entry '{0}': expected -name or +name with name one of {1}")]
    CpuFeature(String, String),
    #[error("Invalid --disk '{spec}'")]
    Disk {
        spec: String,
        #[source]
        source: DiskConfigError,
    },
    #[error("Invalid --net '{spec}'")]
    Net {
        spec: String,
        #[source]
        source: NetConfigError,
    },
    #[error("{0}")]
    Seccomp(String),
    #[error("Invalid --pci-bars '{0}': expected low or high")]
    PciBars(String),
    #[error("Invalid --pci-mmio64-base '{value}': {reason}")]
    PciMmio64Base { value: String, reason: String },
}

/// Guest memory when `--memory` is not given (`ringvm run`).
pub const DEFAULT_MEMORY: &str = "512M";
/// Guest memory for `ringvm bench`: blkbench needs only its rings and buffers (a few MiB);
/// a small guest starts fast, and the 0.5 s ramp absorbs its first-touch faults.
pub const BENCH_MEMORY: &str = "64M";

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    File(PathBuf),
    None,
}

/// Everything needed to build and run a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: KernelImage,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub vcpus: u32,
    pub vcpu_cores: Vec<usize>,
    pub io_cores: Vec<usize>,
    pub hugepages: HugePages,
    pub prefault: bool,
    /// `--memory-merge`: guest RAM is offered to KSM (MADV_MERGEABLE).
    pub memory_merge: bool,
    pub serial: SerialMode,
    pub disks: Vec<DiskConfig>,
    /// `--net` devices (set by `from_args`; `build` leaves it empty).
    pub nets: Vec<NetConfig>,
    pub sqpoll: bool,
    pub stats_json: Option<PathBuf>,
    pub hlog: Option<PathBuf>,
    pub cpu_features: Vec<(bool, String)>,
    /// `--seccomp`.
    pub seccomp: SeccompMode,
    /// The 64-bit BAR window (start, size) with `--pci-bars high`; `None` keeps every BAR
    /// in the 32-bit window.
    pub pci_mmio64: Option<(u64, u64)>,
}

/// Parses "512M", "2G", "4096", "4k".
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(ConfigError::Size(s.to_string())),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| ConfigError::Size(s.to_string()))?;
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError::Size(s.to_string()))
}

/// Cores this process may run on (its affinity mask).
pub fn host_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|v| v.into_iter().map(|c| c.id).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| {
            (0..std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1))
                .collect()
        })
}

/// The default placement: vCPUs from the first core up; reactors on the cores left over, or
/// on the last core when the vCPUs took them all.
pub fn default_plan(vcpus: u32, cores: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let n = cores.len().max(1);
    let vcpu_cores: Vec<usize> = (0..vcpus as usize).map(|i| cores[i % n]).collect();
    let free: Vec<usize> = cores
        .iter()
        .copied()
        .filter(|c| !vcpu_cores.contains(c))
        .collect();
    let io = if free.is_empty() {
        vec![*cores.last().unwrap_or(&0)]
    } else {
        vec![free[0]]
    };
    (vcpu_cores, io)
}

fn check_cores(what: &'static str, list: &[usize], cores: &[usize]) -> Result<(), ConfigError> {
    let last = cores.iter().copied().max().unwrap_or(0);
    match list.iter().find(|c| !cores.contains(c)) {
        Some(&core) => Err(ConfigError::NoSuchCore { what, core, last }),
        None => Ok(()),
    }
}

/// The host CPU's physical address width, which KVM passes on to the guest.
fn host_phys_bits() -> u32 {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext >= 0x8000_0008 {
        std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    }
}

/// The 64-bit BAR window from `--pci-bars` and `--pci-mmio64-base`: 1 GiB aligned, above
/// guest RAM and 4 GiB, and inside the guest's physical address width.
fn pci_mmio64(a: &VmArgs, memory: u64, phys_bits: u32) -> Result<Option<(u64, u64)>, ConfigError> {
    use crate::vmm::layout::{ram_end, HIGH_RAM_START, PCI_MMIO64_ALIGN, PCI_MMIO64_SIZE};
    let high = match a.pci_bars.as_str() {
        "low" => a.pci_mmio64_base.is_some(),
        "high" => true,
        _ => return Err(ConfigError::PciBars(a.pci_bars.clone())),
    };
    if !high {
        return Ok(None);
    }
    let lowest = ram_end(memory)
        .max(HIGH_RAM_START)
        .next_multiple_of(PCI_MMIO64_ALIGN);
    let Some(value) = &a.pci_mmio64_base else {
        return Ok(Some((lowest, PCI_MMIO64_SIZE)));
    };
    let bad = |reason: String| ConfigError::PciMmio64Base {
        value: value.clone(),
        reason,
    };
    let base = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16)
            .map_err(|_| bad("not a hexadecimal address".into()))?,
        None => parse_size(value)
            .map_err(|_| bad("expected an address like 256G or 0x4000000000".into()))?,
    };
    if base % PCI_MMIO64_ALIGN != 0 {
        return Err(bad("not a multiple of 1 GiB".into()));
    }
    if base < lowest {
        return Err(bad(format!(
            "below {lowest:#x}, where guest RAM and the 32-bit MMIO hole end"
        )));
    }
    let limit = 1u64 << phys_bits.min(63);
    if base
        .checked_add(PCI_MMIO64_SIZE)
        .is_none_or(|end| end > limit)
    {
        return Err(bad(format!(
            "the {} GiB window would end beyond the CPU's {phys_bits}-bit physical addresses",
            PCI_MMIO64_SIZE >> 30
        )));
    }
    Ok(Some((base, PCI_MMIO64_SIZE)))
}

fn parse_serial(s: &str) -> Result<SerialMode, ConfigError> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "none" => Ok(SerialMode::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(ConfigError::Serial(s.to_string())),
        },
    }
}

/// Known `--cpu-features` names.
pub fn cpu_feature(name: &str) -> Option<crate::vmm::cpuid::FeatureBit> {
    use crate::vmm::cpuid::{FeatureBit, Reg};
    let (leaf, reg, bit) = match name {
        "cx16" => (1, Reg::Ecx, 13),
        "x2apic" => (1, Reg::Ecx, 21),
        "xsave" => (1, Reg::Ecx, 26),
        "avx" => (1, Reg::Ecx, 28),
        "rdrand" => (1, Reg::Ecx, 30),
        "tsc-deadline" => (1, Reg::Ecx, 24),
        "pcid" => (1, Reg::Ecx, 17),
        "avx2" => (7, Reg::Ebx, 5),
        "avx512f" => (7, Reg::Ebx, 16),
        "rdseed" => (7, Reg::Ebx, 18),
        "smap" => (7, Reg::Ebx, 20),
        "smep" => (7, Reg::Ebx, 7),
        "pdpe1gb" => (0x8000_0001, Reg::Edx, 26),
        "rdtscp" => (0x8000_0001, Reg::Edx, 27),
        _ => return None,
    };
    Some(FeatureBit {
        leaf,
        subleaf: 0,
        reg,
        bit,
    })
}

const CPU_FEATURE_NAMES: &str = "cx16, x2apic, xsave, avx, rdrand, tsc-deadline, pcid, avx2, avx512f, rdseed, smap, smep, pdpe1gb, rdtscp";

impl VmConfig {
    /// Validates `args`; `max_vcpus` is what KVM allows (checked where KVM is open).
    pub fn from_args(run: &RunArgs) -> Result<Self, ConfigError> {
        let disks = run
            .disk
            .iter()
            .map(|d| {
                d.parse::<DiskConfig>().map_err(|source| ConfigError::Disk {
                    spec: d.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let nets = run
            .net
            .iter()
            .map(|n| {
                n.parse::<NetConfig>().map_err(|source| ConfigError::Net {
                    spec: n.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let mut c = Self::build(
            KernelImage::File(run.kernel.clone()),
            run.initrd.clone(),
            run.cmdline.clone(),
            disks,
            &run.vm,
        )?;
        c.nets = nets;
        Ok(c)
    }

    pub fn build(
        kernel: KernelImage,
        initrd: Option<PathBuf>,
        cmdline: String,
        disks: Vec<DiskConfig>,
        a: &VmArgs,
    ) -> Result<Self, ConfigError> {
        let memory_arg = a
            .memory
            .clone()
            .unwrap_or_else(|| DEFAULT_MEMORY.to_string());
        let memory = parse_size(&memory_arg)?;
        let hugepages: HugePages = a.hugepages.parse().map_err(ConfigError::HugePages)?;
        let page = hugepages.page_size();
        if memory < (16 << 20) {
            return Err(ConfigError::Memory {
                size: memory_arg,
                reason: "at least 16M".into(),
            });
        }
        if memory % page != 0 {
            return Err(ConfigError::Memory {
                size: memory_arg,
                reason: format!("not a multiple of the {} KiB page size", page >> 10),
            });
        }
        if a.memory_merge && matches!(hugepages, HugePages::Huge2M | HugePages::Huge1G) {
            return Err(ConfigError::MergeHugetlb(a.hugepages.clone()));
        }
        if a.vcpus == 0 {
            return Err(ConfigError::NoVcpus(0));
        }
        if a.vcpus > MAX_VCPUS as u32 {
            return Err(ConfigError::TooManyVcpus {
                asked: a.vcpus,
                max: MAX_VCPUS as usize,
            });
        }
        let cores = host_cores();
        let (mut vcpu_cores, mut io_cores) = default_plan(a.vcpus, &cores);
        if let Some(list) = &a.vcpu_affinity {
            check_cores("--vcpu-affinity", list, &cores)?;
            if list.len() != a.vcpus as usize {
                return Err(ConfigError::AffinityCount {
                    given: list.len(),
                    vcpus: a.vcpus,
                });
            }
            vcpu_cores = list.clone();
            if a.io_cores.is_none() {
                io_cores = default_plan(0, &cores).1;
                if let Some(free) = cores.iter().find(|c| !vcpu_cores.contains(c)) {
                    io_cores = vec![*free];
                }
            }
        }
        if let Some(list) = &a.io_cores {
            check_cores("--io-cores", list, &cores)?;
            io_cores = list.clone();
        }
        let mut cpu_features = Vec::new();
        for f in &a.cpu_features {
            let (add, name) = match f.as_bytes().first() {
                Some(b'-') => (false, &f[1..]),
                Some(b'+') => (true, &f[1..]),
                _ => return Err(ConfigError::CpuFeature(f.clone(), CPU_FEATURE_NAMES.into())),
            };
            if cpu_feature(name).is_none() {
                return Err(ConfigError::CpuFeature(f.clone(), CPU_FEATURE_NAMES.into()));
            }
            cpu_features.push((add, name.to_string()));
        }
        Ok(VmConfig {
            kernel,
            initrd,
            cmdline,
            memory,
            vcpus: a.vcpus,
            vcpu_cores,
            io_cores,
            hugepages,
            prefault: a.prefault,
            memory_merge: a.memory_merge,
            serial: parse_serial(&a.serial)?,
            disks,
            nets: Vec::new(),
            sqpoll: a.sqpoll,
            stats_json: a.stats_json.clone(),
            hlog: a.hlog.clone(),
            cpu_features,
            seccomp: a.seccomp.parse().map_err(ConfigError::Seccomp)?,
            pci_mmio64: pci_mmio64(a, memory, host_phys_bits())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<VmConfig, ConfigError> {
        let mut v = vec!["ringvm", "run", "--kernel", "k"];
        v.extend_from_slice(extra);
        let cli = crate::cli::Cli::try_parse_from(v).unwrap();
        let crate::cli::Command::Run(r) = cli.command else {
            panic!("parsed as run")
        };
        VmConfig::from_args(&r)
    }

    #[test]
    fn test_pci_bars_high_window_above_ram_and_4g() {
        assert_eq!(args(&[]).unwrap().pci_mmio64, None, "low by default");
        let w = args(&["--pci-bars", "high", "--memory", "64M"]).unwrap();
        assert_eq!(
            w.pci_mmio64,
            Some((1 << 32, crate::vmm::layout::PCI_MMIO64_SIZE))
        );
        // 5 GiB of RAM: 3 GiB below the hole, 2 GiB from 4 GiB up, so RAM ends at 6 GiB.
        let (base, _) = args(&[
            "--pci-bars",
            "high",
            "--memory",
            "5G",
            "--hugepages",
            "none",
        ])
        .unwrap()
        .pci_mmio64
        .unwrap();
        assert_eq!(base, 6 << 30);
        let given = args(&["--pci-mmio64-base", "0x40_0000_0000"]).unwrap();
        assert_eq!(
            given.pci_mmio64.map(|w| w.0),
            Some(256 << 30),
            "a base implies high"
        );
    }

    #[test]
    fn test_pci_bars_bad_values_name_the_problem() {
        let msg = |a: &[&str]| args(a).unwrap_err().to_string();
        assert!(msg(&["--pci-bars", "middle"]).contains("expected low or high"));
        assert!(msg(&["--pci-mmio64-base", "300M"]).contains("multiple of 1 GiB"));
        assert!(msg(&["--pci-mmio64-base", "2G"]).contains("below 0x100000000"));
        assert!(msg(&["--pci-mmio64-base", "0xzz"]).contains("hexadecimal"));
        let e = pci_mmio64(
            &VmArgs {
                pci_mmio64_base: Some("1T".into()),
                ..vm_args()
            },
            64 << 20,
            40,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("40-bit physical addresses"), "{e}");
    }

    fn vm_args() -> VmArgs {
        let cli = crate::cli::Cli::try_parse_from(["ringvm", "run", "--kernel", "k"]).unwrap();
        let crate::cli::Command::Run(r) = cli.command else {
            panic!("parsed as run")
        };
        r.vm
    }

    #[test]
    fn test_net_option_parsed_and_bad_one_named() {
        let c = args(&["--net", "tap=tap0,queues=2", "--net", "tap=tap1"]).unwrap();
        assert_eq!(
            c.nets
                .iter()
                .map(|n| (n.tap.as_str(), n.queues))
                .collect::<Vec<_>>(),
            vec![("tap0", 2), ("tap1", 1)]
        );
        let e = crate::error::error_chain(&args(&["--net", "tap=tap0,queues=0"]).unwrap_err());
        assert!(
            e.starts_with("Invalid --net 'tap=tap0,queues=0': ") && e.contains("`queues`"),
            "{e}"
        );
    }

    #[test]
    fn test_parse_size_suffixes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
    }

    #[test]
    fn test_parse_size_bad_suffix_named() {
        assert_eq!(
            parse_size("512Q").unwrap_err().to_string(),
            "Invalid size '512Q': expected a number with an optional K, M, G or T suffix"
        );
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn test_config_memory_merge_with_hugetlb_rejected_with_thp_kept() {
        let e = args(&["--memory-merge", "--hugepages", "2M"]).unwrap_err();
        assert!(e.to_string().contains("--hugepages 2M"), "{e}");
        let c = args(&["--memory-merge", "--hugepages", "thp"]).unwrap();
        assert!(c.memory_merge);
        assert!(!args(&[]).unwrap().memory_merge);
    }

    #[test]
    fn test_config_memory_not_page_multiple_rejected() {
        let e = args(&["--memory", "513M", "--hugepages", "2M"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a multiple of the 2048 KiB page size"),
            "{e}"
        );
    }

    #[test]
    fn test_config_affinity_unknown_core_rejected() {
        let e = args(&["--vcpu-affinity", "4096"]).unwrap_err();
        assert!(e.to_string().contains("names core 4096"), "{e}");
    }

    #[test]
    fn test_config_too_many_vcpus_rejected() {
        let e = args(&["--vcpus", "1000"]).unwrap_err();
        assert!(e.to_string().contains("more than KVM allows"), "{e}");
    }

    #[test]
    fn test_default_plan_leaves_a_core_for_io() {
        assert_eq!(default_plan(1, &[0, 1]), (vec![0], vec![1]));
        assert_eq!(default_plan(2, &[0, 1]), (vec![0, 1], vec![1]));
        assert_eq!(default_plan(1, &[0]), (vec![0], vec![0]));
    }

    #[test]
    fn test_config_serial_modes() {
        assert_eq!(
            args(&["--serial", "none"]).unwrap().serial,
            SerialMode::None
        );
        assert_eq!(
            args(&["--serial", "file:/tmp/x"]).unwrap().serial,
            SerialMode::File("/tmp/x".into())
        );
        assert!(args(&["--serial", "tty"]).is_err());
    }

    #[test]
    fn test_config_cpu_features_parsed() {
        let c = args(&["--cpu-features=-cx16,+x2apic"]).unwrap();
        assert_eq!(
            c.cpu_features,
            vec![(false, "cx16".to_string()), (true, "x2apic".to_string())]
        );
        assert!(args(&["--cpu-features=-nosuch"]).is_err());
    }
}
