//! ACPI tables, so a Linux guest built without MP-table support (Debian's cloud kernel has
//! no `CONFIG_X86_MPPARSE`) finds its CPUs, the IOAPIC, the PCI host bridge and ECAM.
//!
//! Hardware-reduced ACPI (no PM1 blocks, SCI or PM timer to emulate), as Firecracker and
//! Cloud Hypervisor do: RSDP → XSDT → FADT (→ DSDT), MADT, MCFG. The DSDT describes the PCI
//! host bridge (bus 0, the 32-bit BAR window and, with `--pci-bars high`, the 64-bit one
//! above guest RAM as a QWordMemory range), COM1 and the CMOS RTC, whose IRQs the guest
//! maps from there because a hardware-reduced platform has no legacy PIC. Reset stays the
//! i8042 route (`reboot=k`), so the FADT advertises the 8042. Power-off is ACPI S5: the
//! FADT names the sleep control and status registers (src/devices/legacy/acpi_sleep.rs)
//! and the DSDT's `\_S5` package gives the sleep type to write there.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Name, Package, Path,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::devices::legacy::acpi_sleep::{
    ACPI_SLEEP_BASE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET, SLP_TYP_S5,
};
use crate::devices::legacy::cmos::CMOS_BASE;
use crate::devices::legacy::serial::SERIAL_PORT;
use crate::devices::virtio::GuestMemory;
use crate::vmm::layout::{
    ACPI_START, HIGH_MEMORY_START, IOAPIC_START, LAPIC_START, PCI_ECAM_START, PCI_MMIO_SIZE,
    PCI_MMIO_START, SERIAL_IRQ,
};

const OEM_ID: [u8; 6] = *b"RINGVM";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: an 8042 on ports 0x60/0x64 (the reset path) and no VGA.
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
/// MADT entry types.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// The RTC's ISA interrupt line.
const RTC_IRQ: u32 = 8;

/// The tables, each with the guest address it is written to.
pub struct Tables {
    pub rsdp: u64,
    blobs: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// Bytes from [`ACPI_START`] to the end of the last table.
    pub fn span(&self) -> u64 {
        self.blobs
            .iter()
            .map(|(at, b)| at + b.len() as u64 - ACPI_START)
            .max()
            .unwrap_or(0)
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// An ISA device for the DSDT: `_HID`, optional `_UID`, and a `_CRS` of `ports` I/O ports
/// from `port` and one edge-triggered, active-high, exclusive interrupt.
fn isa_device(name: &str, hid: &str, uid: Option<u32>, port: u16, ports: u8, irq: u32) -> Vec<u8> {
    let hid = EISAName::new(hid);
    let io = IO::new(port, port, 1, ports);
    let irq = Interrupt::new(true, true, false, false, irq);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let hid_name = Name::new(Path::new("_HID"), &hid);
    let crs_name = Name::new(Path::new("_CRS"), &crs);
    let uid_name = uid.map(|u| Name::new(Path::new("_UID"), &u));
    let mut children: Vec<&dyn Aml> = vec![&hid_name];
    if let Some(u) = &uid_name {
        children.push(u);
    }
    children.push(&crs_name);
    bytes(&Device::new(Path::new(name), children))
}

/// `mmio64`: the 64-bit BAR window (start, size), if devices' BARs live there.
fn dsdt(mmio64: Option<(u64, u64)>) -> Vec<u8> {
    let pci_hid = EISAName::new("PNP0A08");
    let pci_cid = EISAName::new("PNP0A03");
    let zero = 0u32;
    let buses = AddressSpace::new_bus_number(0u16, 0u16);
    let cf8 = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    // Not cacheable, so Linux treats it as a non-prefetchable window, which the
    // non-prefetchable 64-bit BARs of virtio-pci (registers with side effects) may use.
    let mmio_high = mmio64.map(|(start, size)| {
        AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            start,
            start + size - 1,
            None,
        )
    });
    let mut windows: Vec<&dyn Aml> = vec![&buses, &cf8, &io_low, &io_high, &mmio];
    if let Some(w) = &mmio_high {
        windows.push(w);
    }
    let pci_crs = ResourceTemplate::new(windows);
    let hid = Name::new(Path::new("_HID"), &pci_hid);
    let cid = Name::new(Path::new("_CID"), &pci_cid);
    let seg = Name::new(Path::new("_SEG"), &zero);
    let bbn = Name::new(Path::new("_BBN"), &zero);
    let uid = Name::new(Path::new("_UID"), &zero);
    let crs = Name::new(Path::new("_CRS"), &pci_crs);
    let pci0 = Device::new(Path::new("PCI0"), vec![&hid, &cid, &seg, &bbn, &uid, &crs]);

    let mut body = bytes(&pci0);
    body.extend(isa_device(
        "COM1",
        "PNP0501",
        Some(0),
        SERIAL_PORT as u16,
        8,
        SERIAL_IRQ,
    ));
    // The CMOS RTC (src/devices/legacy/cmos.rs): without it here Linux's rtc_cmos falls
    // back to a platform device on IRQ 8, which a platform without a PIC never maps.
    body.extend(isa_device(
        "RTC_",
        "PNP0B00",
        None,
        CMOS_BASE as u16,
        2,
        RTC_IRQ,
    ));
    let sb = Scope::raw(Path::new("\\_SB_"), body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RINGDSDT", OEM_REVISION);
    t.append_slice(&sb);
    t.append_slice(&s5());
    t.as_slice().to_vec()
}

/// `Name (\_S5, Package () { SLP_TYPa, SLP_TYPb, 0, 0 })` in the root scope: the value a
/// guest writes to the sleep control register to power off (a hardware-reduced platform
/// uses SLP_TYPa only).
fn s5() -> Vec<u8> {
    let (typ, zero) = (SLP_TYP_S5, 0u8);
    let pkg = Package::new(vec![&typ, &typ, &zero, &zero]);
    bytes(&Name::new(Path::new("\\_S5_"), &pkg))
}

/// One byte-wide I/O port register for the FADT.
fn io_byte_register(port: u64) -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt_at: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"RINGFACP", OEM_REVISION)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi);
    b.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA).into();
    b.sleep_control_reg = io_byte_register(ACPI_SLEEP_BASE + SLEEP_CONTROL_OFFSET);
    b.sleep_status_reg = io_byte_register(ACPI_SLEEP_BASE + SLEEP_STATUS_OFFSET);
    bytes(&b.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let ioapic_id = super::mptable::ioapic_id(vcpus);
    let mut e: Vec<u8> = Vec::new();
    for id in 0..vcpus {
        // type, length, ACPI processor UID, APIC ID, flags (enabled)
        e.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        e.extend_from_slice(&1u32.to_le_bytes());
    }
    // type, length, IOAPIC ID, reserved, address, GSI base
    e.extend_from_slice(&[MADT_IOAPIC, 12, ioapic_id, 0]);
    e.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2 (src/vmm/irq.rs); the serial IRQ's
    // identity entry only states the ISA-to-GSI mapping (Linux maps the port's interrupt
    // from COM1's _CRS in the DSDT): type, length, bus (ISA), source IRQ, GSI, flags
    // (conforming polarity and trigger)
    for (irq, gsi) in [(0u8, 2u32), (SERIAL_IRQ as u8, SERIAL_IRQ)] {
        e.extend_from_slice(&[MADT_INT_SRC_OVERRIDE, 10, 0, irq]);
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
    }
    // NMI on LINT1 of every CPU: type, length, UID 0xff (all), flags, LINT#
    e.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);

    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"RINGAPIC", OEM_REVISION);
    t.write_u32(36, LAPIC_START as u32);
    t.write_u32(40, 0); // flags: no dual 8259 (hardware-reduced)
    t.append_slice(&e);
    t.as_slice().to_vec()
}

fn mcfg() -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, *b"RINGMCFG", OEM_REVISION);
    // ringvm emulates bus 0 only (src/vmm/layout.rs)
    t.add_ecam(PCI_ECAM_START, 0, 0, 0);
    bytes(&t)
}

/// Builds every table for `vcpus` CPUs and lays them out from [`ACPI_START`].
pub fn build(vcpus: u8, mmio64: Option<(u64, u64)>) -> Tables {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_at = ACPI_START;
    let xsdt_len = 36 + 3 * 8;
    let xsdt_at = align(rsdp_at + Rsdp::len() as u64);
    let dsdt_at = align(xsdt_at + xsdt_len);
    let dsdt = dsdt(mmio64);
    let fadt_at = align(dsdt_at + dsdt.len() as u64);
    let fadt = fadt(dsdt_at);
    let madt_at = align(fadt_at + fadt.len() as u64);
    let madt = madt(vcpus);
    let mcfg_at = align(madt_at + madt.len() as u64);
    let mcfg = mcfg();
    let mut xsdt = XSDT::new(OEM_ID, *b"RINGXSDT", OEM_REVISION);
    for at in [fadt_at, madt_at, mcfg_at] {
        xsdt.add_entry(at);
    }
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    Tables {
        rsdp: rsdp_at,
        blobs: vec![
            (rsdp_at, bytes(&Rsdp::new(OEM_ID, xsdt_at))),
            (xsdt_at, xsdt),
            (dsdt_at, dsdt),
            (fadt_at, fadt),
            (madt_at, madt),
            (mcfg_at, mcfg),
        ],
    }
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn write(mem: &GuestMemory, vcpus: u8, mmio64: Option<(u64, u64)>) -> Result<u64, BootError> {
    let t = build(vcpus, mmio64);
    if ACPI_START + t.span() > HIGH_MEMORY_START {
        return Err(BootError::Params(format!(
            "ACPI tables ({} bytes) do not fit below 1 MiB",
            t.span()
        )));
    }
    for (at, b) in &t.blobs {
        mem.write_slice(b, GuestAddress(*at))
            .map_err(|source| BootError::Memory {
                what: "ACPI tables",
                source,
            })?;
    }
    Ok(t.rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::mptable::MAX_VCPUS;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table with `signature` (`b"RSD "` for the RSDP).
    fn get<'a>(t: &'a Tables, signature: &[u8; 4]) -> &'a [u8] {
        t.blobs
            .iter()
            .find(|(_, b)| b.starts_with(signature))
            .map(|(_, b)| b.as_slice())
            .unwrap()
    }

    /// Finds a table by following RSDP → XSDT, as the guest does.
    fn follow<'a>(t: &'a Tables, sig: &[u8; 4]) -> &'a [u8] {
        let rsdp = get(t, b"RSD ");
        let xsdt_at = u64_at(rsdp, 24);
        let xsdt = t
            .blobs
            .iter()
            .find(|(at, _)| *at == xsdt_at)
            .map(|(_, b)| b.as_slice())
            .expect("XSDT at the RSDP's address");
        assert_eq!(&xsdt[..4], b"XSDT");
        let n = (u32_at(xsdt, 4) as usize - 36) / 8;
        (0..n)
            .map(|i| u64_at(xsdt, 36 + 8 * i))
            .filter_map(|at| t.blobs.iter().find(|(a, _)| *a == at))
            .map(|(_, b)| b.as_slice())
            .find(|b| b.starts_with(sig))
            .unwrap_or_else(|| panic!("{} not reachable from the XSDT", sig.escape_ascii()))
    }

    #[test]
    fn test_acpi_checksums_and_lengths() {
        let t = build(4, None);
        let rsdp = get(&t, b"RSD ");
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP (XSDT)");
        for (_, b) in t.blobs.iter().skip(1) {
            let sig = b[..4].escape_ascii().to_string();
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{sig} length field");
            assert_eq!(sum(b), 0, "{sig} checksum");
        }
    }

    #[test]
    fn test_acpi_madt_lists_every_cpu_and_the_ioapic() {
        let t = build(3, None);
        let madt = follow(&t, b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
        let (mut cpus, mut ioapics, mut overrides) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            assert!(len >= 2 && at + len <= madt.len(), "entry at {at} overruns");
            let e = &madt[at..at + len];
            match kind {
                MADT_LOCAL_APIC => cpus.push((e[3], u32_at(e, 4))),
                MADT_IOAPIC => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                MADT_INT_SRC_OVERRIDE => overrides.push((e[3], u32_at(e, 4))),
                _ => {}
            }
            at += len;
        }
        assert_eq!(cpus, vec![(0, 1), (1, 1), (2, 1)], "APIC IDs, all enabled");
        assert_eq!(ioapics, vec![(4, IOAPIC_START as u32, 0)]);
        assert!(overrides.contains(&(0, 2)), "PIT on GSI 2: {overrides:?}");
    }

    #[test]
    fn test_acpi_fadt_is_hardware_reduced_and_points_at_dsdt() {
        let t = build(1, None);
        let fadt = follow(&t, b"FACP");
        assert_ne!(u32_at(fadt, 112) & Flags::HwReducedAcpi as u32, 0);
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(iapc & IAPC_8042, 0);
        assert_eq!(iapc & (1 << 3), 0, "MSI must not be reported unsupported");
        let dsdt_at = u64_at(fadt, 140);
        let dsdt = &t.blobs.iter().find(|(a, _)| *a == dsdt_at).unwrap().1;
        assert_eq!(&dsdt[..4], b"DSDT");
        let has = |s: &[u8]| dsdt.windows(s.len()).any(|w| w == s);
        assert!(has(b"PCI0") && has(b"COM1") && has(b"RTC_") && has(b"_CRS"));
        // EisaId("PNP0A08"), the PCIe host bridge
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    }

    /// The DSDT's `_CRS` for the host bridge, as AML bytes.
    fn dsdt_of(t: &Tables) -> Vec<u8> {
        let fadt = follow(t, b"FACP");
        let at = u64_at(fadt, 140);
        t.blobs.iter().find(|(a, _)| *a == at).unwrap().1.clone()
    }

    /// QWordMemory descriptors (tag 0x8a) in `aml`: (min, max, length).
    fn qword_memory(aml: &[u8]) -> Vec<(u64, u64, u64)> {
        let mut found = Vec::new();
        for i in 0..aml.len().saturating_sub(46) {
            // tag, length 43, resource type 0 (memory)
            if aml[i] == 0x8a && aml[i + 1] == 43 && aml[i + 2] == 0 && aml[i + 3] == 0 {
                let (min, max, len) = (
                    u64_at(aml, i + 14),
                    u64_at(aml, i + 22),
                    u64_at(aml, i + 38),
                );
                found.push((min, max, len));
            }
        }
        found
    }

    #[test]
    fn test_acpi_dsdt_reports_the_64bit_window_only_when_there_is_one() {
        assert_eq!(qword_memory(&dsdt_of(&build(1, None))), vec![]);
        let start = 0x40_0000_0000u64;
        let size = crate::vmm::layout::PCI_MMIO64_SIZE;
        let t = build(1, Some((start, size)));
        assert_eq!(
            qword_memory(&dsdt_of(&t)),
            vec![(start, start + size - 1, size)],
            "a QWordMemory range for the high window"
        );
        let dsdt = dsdt_of(&t);
        assert_eq!(sum(&dsdt), 0, "checksum still holds");
        assert_eq!(u32_at(&dsdt, 4) as usize, dsdt.len());
    }

    /// FADT offsets of SLEEP_CONTROL_REG and SLEEP_STATUS_REG (ACPI 6.5, table 5.9).
    const FADT_SLEEP_CONTROL: usize = 244;
    const FADT_SLEEP_STATUS: usize = 256;

    #[test]
    fn test_acpi_fadt_sleep_registers_name_the_sleep_ports() {
        let t = build(1, None);
        let fadt = follow(&t, b"FACP");
        assert!(
            fadt.len() >= FADT_SLEEP_STATUS + 12,
            "FADT too short for the sleep registers"
        );
        for (at, port) in [
            (FADT_SLEEP_CONTROL, ACPI_SLEEP_BASE + SLEEP_CONTROL_OFFSET),
            (FADT_SLEEP_STATUS, ACPI_SLEEP_BASE + SLEEP_STATUS_OFFSET),
        ] {
            let gas = &fadt[at..at + 12];
            // space id (system I/O), bit width 8, bit offset 0, byte access
            assert_eq!(&gas[..4], &[1, 8, 0, 1], "GAS at {at}");
            assert_eq!(u64_at(gas, 4), port, "GAS at {at}");
        }
        assert_ne!(
            u64_at(fadt, FADT_SLEEP_CONTROL + 4),
            u64_at(fadt, FADT_SLEEP_STATUS + 4),
            "control and status are different registers"
        );
    }

    #[test]
    fn test_acpi_dsdt_s5_package_gives_the_device_sleep_type() {
        let t = build(1, None);
        let fadt = follow(&t, b"FACP");
        let dsdt_at = u64_at(fadt, 140);
        let dsdt = &t.blobs.iter().find(|(a, _)| *a == dsdt_at).unwrap().1;
        // NameOp, root prefix, "_S5_", PackageOp: in the root scope, not under \_SB_.
        let name = [&[0x08, b'\\'][..], b"_S5_", &[0x12]].concat();
        let at = dsdt
            .windows(name.len())
            .position(|w| w == name.as_slice())
            .expect("\\_S5_ package in the DSDT");
        let pkg = &dsdt[at + name.len()..];
        // PkgLength (one byte: short package), NumElements 4, then BytePrefix SLP_TYP twice
        let len = usize::from(pkg[0]);
        assert!(
            len < 0x40 && at + name.len() + len <= dsdt.len(),
            "package length {len}"
        );
        assert_eq!(pkg[1], 4, "four elements");
        assert_eq!(
            &pkg[2..6],
            &[0x0a, SLP_TYP_S5, 0x0a, SLP_TYP_S5],
            "SLP_TYPa, SLP_TYPb"
        );
        // What a guest writes from this package powers the sleep device off.
        use crate::devices::legacy::acpi_sleep::{sleep_control_value, AcpiSleep};
        use crate::vmm::bus::BusDevice;
        use crate::vmm::exit::{ExitHandle, ExitReason};
        let exit = ExitHandle::new().unwrap();
        let mut dev = AcpiSleep::new(exit.clone());
        dev.write(SLEEP_CONTROL_OFFSET, &[sleep_control_value(pkg[3])]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn test_acpi_mcfg_maps_bus0_ecam() {
        let t = build(1, None);
        let mcfg = follow(&t, b"MCFG");
        assert_eq!(u64_at(mcfg, 44), PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0-0");
    }

    #[test]
    fn test_acpi_fits_below_1mib_and_clear_of_mptable() {
        let t = build(MAX_VCPUS, None);
        assert!(ACPI_START + t.span() <= HIGH_MEMORY_START);
        let mp_end = crate::vmm::layout::MPTABLE_ADDR as usize
            + crate::boot::mptable::build(MAX_VCPUS).len();
        assert!(mp_end as u64 <= ACPI_START);
    }
}
