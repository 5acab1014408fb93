//! Structural checks of the built tables through the public API.

mod common;

use common::*;
use hyperpool_acpi::{AcpiConfig, AcpiError, AcpiTables, build};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn tables(cpus: u32) -> AcpiTables {
    build(&cfg(cpus)).expect("build")
}

fn get<'a>(t: &'a AcpiTables, sig: &[u8; 4]) -> &'a [u8] {
    &t.table(sig)
        .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)))
        .bytes
}

#[test]
fn builds_the_expected_tables_in_order() {
    let t = tables(1);
    let sigs: Vec<&[u8; 4]> = t.tables.iter().map(|t| &t.signature).collect();
    assert_eq!(sigs, [b"XSDT", b"FACP", b"DSDT", b"APIC", b"MCFG"]);
    let no_pci = build(&AcpiConfig {
        pci: None,
        ..cfg(1)
    })
    .unwrap();
    assert!(no_pci.table(b"MCFG").is_none());
    assert_eq!(no_pci.tables.len(), 4);
    for table in &t.tables {
        assert_eq!(&table.bytes[0..4], &table.signature);
        assert_eq!(
            u32_at(&table.bytes, 4) as usize,
            table.bytes.len(),
            "length field"
        );
        assert_eq!(&table.bytes[10..16], b"HYPRPL");
        assert_eq!(&table.bytes[16..24], b"HYPERPOO");
    }
}

#[test]
fn every_checksum_is_valid() {
    for cpus in [1, 4, 300] {
        let t = tables(cpus);
        assert_eq!(t.rsdp.len(), 36);
        assert_eq!(sum(&t.rsdp[..20]), 0, "RSDP 20-byte checksum");
        assert_eq!(sum(&t.rsdp), 0, "RSDP extended checksum");
        for table in &t.tables {
            assert_eq!(sum(&table.bytes), 0, "{:?}", table.signature);
        }
    }
}

#[test]
fn rsdp_is_revision_2_and_points_at_xsdt() {
    let t = tables(2);
    assert_eq!(&t.rsdp[0..8], b"RSD PTR ");
    assert_eq!(&t.rsdp[9..15], b"HYPRPL");
    assert_eq!(t.rsdp[15], 2, "revision");
    assert_eq!(u32_at(&t.rsdp, 16), 0, "no RSDT");
    assert_eq!(u32_at(&t.rsdp, 20), 36, "length");
    assert_eq!(u64_at(&t.rsdp, 24), t.table(b"XSDT").unwrap().addr);
    assert_eq!(t.rsdp_addr, 0xE0000);
}

#[test]
fn xsdt_lists_fadt_and_madt() {
    let t = tables(2);
    let xsdt = get(&t, b"XSDT");
    let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
    let addr = |sig| t.table(sig).unwrap().addr;
    assert_eq!(entries, [addr(b"FACP"), addr(b"APIC"), addr(b"MCFG")]);
}

#[test]
fn fadt_is_hw_reduced_with_io_registers_and_x_dsdt() {
    let c = cfg(2);
    let t = build(&c).unwrap();
    let fadt = get(&t, b"FACP");
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "FADT major version");
    assert_eq!(fadt[131], 5, "FADT minor version");
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
    assert_eq!(u64_at(fadt, 140), t.table(b"DSDT").unwrap().addr, "X_DSDT");

    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");

    assert_eq!(gas_at(fadt, 116), io_byte(c.reset_port), "RESET_REG");
    assert_eq!(fadt[128], c.reset_value, "RESET_VALUE");
    assert_eq!(
        gas_at(fadt, 244),
        io_byte(c.sleep_control_port),
        "SLEEP_CONTROL_REG"
    );
    assert_eq!(
        gas_at(fadt, 256),
        io_byte(c.sleep_status_port),
        "SLEEP_STATUS_REG"
    );
    assert_eq!(
        (c.sleep_control_port, c.sleep_status_port, c.reset_port),
        (0x600, 0x601, 0x602)
    );
}

#[test]
fn fadt_boot_arch_flags_follow_devices() {
    const LEGACY: u16 = 1 << 0;
    const I8042: u16 = 1 << 1;
    const NO_VGA: u16 = 1 << 2;
    const NO_RTC: u16 = 1 << 5;
    let boot_arch = |c: &AcpiConfig| u16_at(get(&build(c).unwrap(), b"FACP"), 109);

    assert_eq!(boot_arch(&cfg(1)), LEGACY | I8042 | NO_VGA);
    let bare = AcpiConfig {
        serial: None,
        i8042: false,
        rtc: None,
        ..cfg(1)
    };
    assert_eq!(boot_arch(&bare), NO_VGA | NO_RTC);
}

/// `(apic_id, processor_uid)` of every enabled local APIC / x2APIC entry.
fn enabled_cpus(madt: &[u8]) -> Vec<(u32, u32)> {
    let mut cpus = Vec::new();
    for (ty, e) in madt_entries(madt) {
        match ty {
            0 => {
                assert_eq!(e.len(), 8);
                if u32_at(e, 4) & 1 != 0 {
                    cpus.push((u32::from(e[3]), u32::from(e[2])));
                }
            }
            9 => {
                assert_eq!(e.len(), 16);
                if u32_at(e, 8) & 1 != 0 {
                    cpus.push((u32_at(e, 4), u32_at(e, 12)));
                }
            }
            _ => {}
        }
    }
    cpus
}

#[test]
fn madt_has_one_enabled_entry_per_cpu() {
    for cpus in [1u32, 4, 254, 255, 256, 300] {
        let t = tables(cpus);
        let madt = get(&t, b"APIC");
        let expected: Vec<(u32, u32)> = (0..cpus).map(|id| (id, id)).collect();
        assert_eq!(enabled_cpus(madt), expected, "cpus={cpus}");

        // xAPIC entries exactly for ids < 255, x2APIC for the rest.
        let entries = madt_entries(madt);
        let xapic = entries.iter().filter(|(ty, _)| *ty == 0).count() as u32;
        let x2apic = entries.iter().filter(|(ty, _)| *ty == 9).count() as u32;
        assert_eq!(xapic, cpus.min(255), "cpus={cpus}");
        assert_eq!(x2apic, cpus.saturating_sub(255), "cpus={cpus}");
    }
}

#[test]
fn madt_header_ioapic_and_pit_override() {
    let c = AcpiConfig {
        ioapic_id: 3,
        ..cfg(4)
    };
    let t = build(&c).unwrap();
    let madt = get(&t, b"APIC");
    assert_eq!(u32_at(madt, 36), 0xFEE0_0000, "local APIC address");
    assert_eq!(u32_at(madt, 40) & 1, 1, "PCAT_COMPAT");

    let entries = madt_entries(madt);
    let ioapics: Vec<&[u8]> = entries
        .iter()
        .filter(|(ty, _)| *ty == 1)
        .map(|e| e.1)
        .collect();
    assert_eq!(ioapics.len(), 1);
    let io = ioapics[0];
    assert_eq!((io[1], io[2]), (12, 3), "length, id");
    assert_eq!(u32_at(io, 4), 0xFEC0_0000);
    assert_eq!(u32_at(io, 8), 0, "GSI base");

    let isos: Vec<&[u8]> = entries
        .iter()
        .filter(|(ty, _)| *ty == 2)
        .map(|e| e.1)
        .collect();
    assert_eq!(isos.len(), 1);
    let iso = isos[0];
    assert_eq!(
        (iso[1], iso[2], iso[3]),
        (10, 0, 0),
        "length, ISA bus, IRQ0"
    );
    assert_eq!(u32_at(iso, 4), 2, "GSI 2");
}

#[test]
fn dsdt_has_s5_and_devices() {
    let c = cfg(3);
    let t = build(&c).unwrap();
    let dsdt = get(&t, b"DSDT");
    // Name (_S5_, Package (4) { 5, 0, 0, 0 })
    assert!(contains(dsdt, b"\x08_S5_\x12\x07\x04\x0a\x05\x00\x00\x00"));
    // EISA ids as DWordConst: PNP0501 (COM1), PNP0303 (i8042), PNP0B00 (RTC).
    assert!(contains(dsdt, &[0x0C, 0x41, 0xD0, 0x05, 0x01]));
    assert!(contains(dsdt, &[0x0C, 0x41, 0xD0, 0x03, 0x03]));
    assert!(contains(dsdt, &[0x0C, 0x41, 0xD0, 0x0B, 0x00]));
    assert!(contains(dsdt, b"COM1") && contains(dsdt, b"PS2K") && contains(dsdt, b"RTC_"));
    // COM1 _CRS: IO (Decode16, 0x3F8, 0x3F8, 1, 8) and Extended IRQ 4.
    assert!(contains(
        dsdt,
        &[0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08]
    ));
    assert!(contains(
        dsdt,
        &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]
    ));
    // Processor devices C000..C002, and not C003.
    assert!(contains(dsdt, b"ACPI0007"));
    for id in 0..3 {
        assert!(contains(dsdt, format!("C{id:03X}").as_bytes()));
    }
    assert!(!contains(dsdt, b"C003"));
}

#[test]
fn dsdt_omits_absent_devices() {
    let c = AcpiConfig {
        serial: None,
        i8042: false,
        rtc: None,
        ..cfg(1)
    };
    let dsdt = build(&c).unwrap().table(b"DSDT").unwrap().bytes.clone();
    assert!(!contains(&dsdt, &[0x41, 0xD0, 0x05, 0x01]));
    assert!(!contains(&dsdt, &[0x41, 0xD0, 0x03, 0x03]));
    assert!(!contains(&dsdt, &[0x41, 0xD0, 0x0B, 0x00]));
    assert!(contains(&dsdt, b"_S5_"));
}

#[test]
fn tables_lie_inside_the_region_without_overlap() {
    let big_region = AcpiConfig {
        tables_end: 0x20_0000,
        ..cfg(4096)
    };
    for c in [cfg(1), cfg(300), cfg(1024), big_region] {
        let cpus = c.cpus;
        let t = build(&c).unwrap();
        let mut ranges = vec![(t.rsdp_addr, t.rsdp.len() as u64)];
        ranges.extend(t.tables.iter().map(|t| (t.addr, t.bytes.len() as u64)));
        let mut prev_end = c.rsdp_addr;
        for (addr, len) in ranges {
            assert!(addr >= prev_end, "overlap at {addr:#x}");
            assert_eq!(addr % 16, 0, "alignment of {addr:#x}");
            prev_end = addr + len;
        }
        assert!(
            prev_end <= c.tables_end,
            "cpus={cpus}: ends at {prev_end:#x}"
        );
    }
}

#[test]
fn overflowing_the_region_is_an_error() {
    let small = AcpiConfig {
        tables_end: 0xE0000 + 0x100,
        ..cfg(1)
    };
    match build(&small) {
        Err(AcpiError::RegionOverflow {
            start,
            needed_end,
            limit,
        }) => {
            assert_eq!((start, limit), (0xE0000, 0xE0100));
            assert!(needed_end > limit);
        }
        other => panic!("expected RegionOverflow, got {other:?}"),
    }
    // The 128 KiB BIOS area cannot describe KVM's maximum of 4096 vCPUs.
    assert!(matches!(
        build(&cfg(4096)),
        Err(AcpiError::RegionOverflow { .. })
    ));
    // Exactly enough room succeeds.
    let t = build(&cfg(1)).unwrap();
    let last = t.tables.last().unwrap();
    let exact = AcpiConfig {
        tables_end: last.addr + last.bytes.len() as u64,
        ..cfg(1)
    };
    assert!(build(&exact).is_ok());
    let short = AcpiConfig {
        tables_end: exact.tables_end - 1,
        ..cfg(1)
    };
    assert!(matches!(
        build(&short),
        Err(AcpiError::RegionOverflow { .. })
    ));
}

#[test]
fn invalid_configs_are_errors() {
    assert!(matches!(build(&cfg(0)), Err(AcpiError::NoCpus)));
    assert!(matches!(
        build(&cfg(4097)),
        Err(AcpiError::TooManyCpus { .. })
    ));
    let misaligned = AcpiConfig {
        rsdp_addr: 0xE0008,
        ..cfg(1)
    };
    assert!(matches!(
        build(&misaligned),
        Err(AcpiError::MisalignedRsdp(0xE0008))
    ));
}

#[test]
fn write_to_guest_memory_round_trips() {
    let t = tables(4);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    t.write_to(&mem).unwrap();

    let mut rsdp = vec![0u8; t.rsdp.len()];
    mem.read_slice(&mut rsdp, GuestAddress(t.rsdp_addr))
        .unwrap();
    assert_eq!(rsdp, t.rsdp);
    for table in &t.tables {
        let mut buf = vec![0u8; table.bytes.len()];
        mem.read_slice(&mut buf, GuestAddress(table.addr)).unwrap();
        assert_eq!(buf, table.bytes, "{:?}", table.signature);
    }
}

#[test]
fn write_to_too_small_guest_memory_fails() {
    let t = tables(1);
    // RAM ends in the middle of the table region.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xE0100)]).unwrap();
    match t.write_to(&mem) {
        Err(AcpiError::GuestMemory { addr, .. }) => assert!(addr >= 0xE0000),
        other => panic!("expected GuestMemory error, got {other:?}"),
    }
}

#[test]
fn mcfg_describes_the_ecam_window() {
    let pci = hyperpool_acpi::PciConfig {
        ecam_base: 0xb000_0000,
        bus_end: 3,
        ..Default::default()
    };
    let t = build(&AcpiConfig {
        pci: Some(pci),
        ..cfg(2)
    })
    .unwrap();
    let mcfg = get(&t, b"MCFG");
    assert_eq!(mcfg.len(), 60);
    assert_eq!(sum(mcfg), 0);
    assert_eq!(mcfg[8], 1, "revision");
    assert_eq!(u64_at(mcfg, 36), 0, "reserved");
    assert_eq!(u64_at(mcfg, 44), 0xb000_0000, "ECAM base");
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!((mcfg[54], mcfg[55]), (0, 3), "bus range");
}
