//! CPUID as each vCPU sees it: KVM's supported set, with the vCPU's APIC ID and topology,
//! the hypervisor bit, and the timing leaf (0x40000010) that tells a guest the TSC rate.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// The "timing information" leaf (VMware's convention, read by Linux and blkbench):
/// EAX = TSC frequency in kHz, EBX = local APIC bus frequency in kHz.
pub const LEAF_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

const ECX_HYPERVISOR: u32 = 1 << 31;

/// A CPUID feature bit by register, for `--cpu-features` style masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// `cx16` (CMPXCHG16B), which this host's ring-0 emulator cannot execute.
pub const FEATURE_CX16: FeatureBit = FeatureBit {
    leaf: 1,
    subleaf: 0,
    reg: Reg::Ecx,
    bit: 13,
};
/// `smap`: with it Linux patches `clac`/`stac` into every entry path, which this host's
/// emulator cannot execute (ringvm can, but each one costs an exit to userspace).
pub const FEATURE_SMAP: FeatureBit = FeatureBit {
    leaf: 7,
    subleaf: 0,
    reg: Reg::Ebx,
    bit: 20,
};

fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn set_entry(cpuid: &mut CpuId, entry: kvm_cpuid_entry2) {
    let entries = cpuid.as_mut_slice();
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.function == entry.function && e.index == entry.index)
    {
        *e = entry;
        return;
    }
    // Out of room is not fatal: the guest just misses an optional leaf.
    if cpuid.push(entry).is_err() {
        log::warn!("cpuid: no room for leaf {:#x}", entry.function);
    }
}

/// Patches `base` (KVM's supported CPUID) for vCPU `id` of `count`.
pub fn for_vcpu(
    base: &CpuId,
    id: u32,
    count: u32,
    tsc_khz: Option<u32>,
    masked: &[FeatureBit],
) -> CpuId {
    let mut cpuid = base.clone();
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the package has more than one logical processor
                }
            }
            LEAF_CACHE => {
                e.eax = (e.eax & 0x03ff_ffff) | ((count.saturating_sub(1)).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_HYPERVISOR => {
                e.eax = e.eax.max(LEAF_TIMING);
            }
            _ => {}
        }
    }
    if let Some(khz) = tsc_khz {
        set_entry(
            &mut cpuid,
            kvm_cpuid_entry2 {
                function: LEAF_TIMING,
                eax: khz,
                ebx: APIC_BUS_KHZ,
                ..Default::default()
            },
        );
    }
    for m in masked {
        mask(&mut cpuid, *m);
    }
    cpuid
}

/// Sets feature bit `f` wherever its leaf appears (`--cpu-features +name`).
pub fn add(cpuid: &mut CpuId, f: FeatureBit) {
    update(cpuid, f, true);
}

/// Clears feature bit `f` wherever its leaf appears.
pub fn mask(cpuid: &mut CpuId, f: FeatureBit) {
    update(cpuid, f, false);
}

fn update(cpuid: &mut CpuId, f: FeatureBit, set: bool) {
    for e in cpuid.as_mut_slice().iter_mut() {
        let index_matters = e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0;
        if e.function == f.leaf && (!index_matters || e.index == f.subleaf) {
            let r = match f.reg {
                Reg::Eax => &mut e.eax,
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            if set {
                *r |= 1u32 << f.bit;
            } else {
                *r &= !(1u32 << f.bit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 1 << 13,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn test_cpuid_apic_id_and_topology_per_vcpu() {
        let c = for_vcpu(&base(), 3, 4, None, &[]);
        assert_eq!(leaf(&c, 1, 0).ebx >> 24, 3);
        assert_ne!(leaf(&c, 1, 0).ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf(&c, 0xb, 0).edx, 3);
        assert_eq!(leaf(&c, 0xb, 1).ebx, 4);
        assert_eq!(leaf(&c, 0xb, 1).eax, 2);
    }

    #[test]
    fn test_cpuid_timing_leaf_carries_tsc_khz() {
        let c = for_vcpu(&base(), 0, 1, Some(2_100_000), &[]);
        assert_eq!(leaf(&c, LEAF_TIMING, 0).eax, 2_100_000);
        assert!(leaf(&c, LEAF_HYPERVISOR, 0).eax >= LEAF_TIMING);
    }

    #[test]
    fn test_cpuid_add_sets_bit() {
        let mut c = base();
        add(
            &mut c,
            FeatureBit {
                leaf: 1,
                subleaf: 0,
                reg: Reg::Ecx,
                bit: 21,
            },
        );
        assert_ne!(leaf(&c, 1, 0).ecx & (1 << 21), 0);
    }

    #[test]
    fn test_cpuid_mask_clears_cx16() {
        let c = for_vcpu(&base(), 0, 1, None, &[FEATURE_CX16]);
        assert_eq!(leaf(&c, 1, 0).ecx & (1 << 13), 0);
    }
}
