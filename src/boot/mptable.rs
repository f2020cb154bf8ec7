//! An Intel MultiProcessor Specification 1.4 table, so an SMP Linux guest booted without
//! ACPI finds its CPUs, the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::devices::virtio::GuestMemory;
use crate::vmm::layout::{IOAPIC_START, LAPIC_START, MPTABLE_ADDR};

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;
/// ISA IRQs routed 1:1 to IOAPIC pins (pin 0 is the PIT through the PIC's cascade).
const ISA_IRQS: u8 = 16;
/// APIC IDs are 8 bits and the IOAPIC takes the ID after the last CPU.
pub const MAX_VCPUS: u8 = 254;

/// The IOAPIC's APIC ID: the one after the last CPU's (the MP table and the ACPI MADT agree).
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus + 1
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer structure followed by the configuration table.
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = ioapic_id(vcpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        // type, apic id, apic version, flags, signature (family 6), feature flags (FPU|APIC)
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // type, irq type, flags (conforming), src bus, src irq, dst apic, dst pin
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_SRC_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_SRC_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_SRC_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const MPF_LEN: usize = 16;
    const MPC_HEADER_LEN: usize = 44;
    let table_addr = MPTABLE_ADDR as u32 + MPF_LEN as u32;
    let mut mpc = Vec::with_capacity(MPC_HEADER_LEN + entries.len());
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&((MPC_HEADER_LEN + entries.len()) as u16).to_le_bytes());
    mpc.push(4); // spec revision 1.4
    mpc.push(0); // checksum, filled below
    mpc.extend_from_slice(b"RINGVM  ");
    mpc.extend_from_slice(b"000000000000");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&count.to_le_bytes());
    mpc.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    mpc.extend_from_slice(&[0; 4]); // extended table length/checksum, reserved
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_LEN);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // revision
    mpf.push(0); // checksum
    mpf.extend_from_slice(&[0; 5]);
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&mpc);
    mpf
}

/// Writes the MP table at [`MPTABLE_ADDR`] (in the EBDA, where Linux scans for it).
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), BootError> {
    mem.write_slice(&build(vcpus), GuestAddress(MPTABLE_ADDR))
        .map_err(|source| BootError::Memory {
            what: "MP table",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn test_mptable_checksums_and_cpu_count() {
        let t = build(4);
        assert_eq!(&t[..4], MPF_SIGNATURE);
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        let mpc = &t[16..];
        assert_eq!(&mpc[..4], MPC_SIGNATURE);
        let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(sum(mpc), 0, "config table checksum");
        let cpus = mpc[44..]
            .chunks(20)
            .take_while(|e| e[0] == MP_PROCESSOR)
            .count();
        assert_eq!(cpus, 4);
        assert_eq!(mpc[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
        let entry_count = u16::from_le_bytes([mpc[34], mpc[35]]);
        assert_eq!(entry_count as usize, 4 + 1 + 1 + 16 + 2);
    }

    #[test]
    fn test_mptable_fits_below_1mib() {
        assert!(MPTABLE_ADDR as usize + build(MAX_VCPUS).len() <= 0x10_0000);
    }
}
