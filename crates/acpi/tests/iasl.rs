//! Disassembles the dumped tables with ACPICA's `iasl -d`.
//!
//! Without `iasl` on PATH these tests are skipped with a message, unless
//! `CI=true`, where a missing `iasl` is a failure (CI installs acpica-tools).
//!
//! `iasl -d` exits 0 even for corrupt tables (a bad checksum or an invalid
//! name is only a "Warning"), so any "Error" *or* "Warning" in its output
//! fails the test; `flags_a_corrupt_table` proves the check can fail.
//!
//! The RSDP is not disassembled: ACPICA cannot load a raw RSDP from a file
//! ("Loading an RSDP is not supported", acfileio.c). Its checksums are
//! covered in `tables.rs`.

mod common;

use std::path::Path;
use std::process::Command;

use common::cfg;
use hyperpool_acpi::{AcpiConfig, build};

/// Whether `iasl` can run; panics if it is missing under `CI=true`.
fn have_iasl() -> bool {
    match Command::new("iasl").arg("-v").output() {
        Ok(_) => true,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("iasl is required in CI (apt-get install acpica-tools): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: iasl not runnable ({e}); install acpica-tools");
            false
        }
    }
}

/// Runs `iasl -d NAME.dat` in `dir`; returns the disassembly, or why it failed.
fn disassemble(dir: &Path, name: &str) -> Result<String, String> {
    let out = Command::new("iasl")
        .arg("-d")
        .arg(format!("{name}.dat"))
        .current_dir(dir)
        .output()
        .expect("run iasl");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || log.contains("Error") || log.contains("Warning") {
        return Err(format!("iasl -d {name}.dat: {}\n{log}", out.status));
    }
    std::fs::read_to_string(dir.join(format!("{name}.dsl")))
        .map_err(|e| format!("no {name}.dsl: {e}\n{log}"))
}

/// Dumps `cfg`'s tables and disassembles every SDT; returns the .dsl texts.
fn disassemble_all(cfg: &AcpiConfig) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let tables = build(cfg).unwrap();
    tables.dump(dir.path()).unwrap();
    assert!(dir.path().join("RSDP.dat").is_file());
    tables
        .tables
        .iter()
        .map(|t| {
            let name = String::from_utf8_lossy(&t.signature).into_owned();
            let dsl = disassemble(dir.path(), &name).unwrap_or_else(|e| panic!("{e}"));
            (name, dsl)
        })
        .collect()
}

fn dsl<'a>(all: &'a [(String, String)], name: &str) -> &'a str {
    &all.iter().find(|(n, _)| *n == name).unwrap().1
}

#[test]
fn iasl_disassembles_every_table() {
    if !have_iasl() {
        return;
    }
    for cpus in [1, 4, 300] {
        let all = disassemble_all(&cfg(cpus));

        let dsdt = dsl(&all, "DSDT");
        for needle in [
            "Name (_S5, Package (0x04)",
            "EisaId (\"PNP0501\")",
            "EisaId (\"PNP0303\")",
            "EisaId (\"PNP0B00\")",
            "\"ACPI0010\"",
            "0x03F8,             // Range Minimum",
        ] {
            assert!(
                dsdt.contains(needle),
                "cpus={cpus}: DSDT lacks {needle:?}:\n{dsdt}"
            );
        }
        assert_eq!(dsdt.matches("\"ACPI0007\"").count(), cpus as usize);

        let fadt = dsl(&all, "FACP");
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
        assert!(fadt.contains("Reset Register Supported (V2) : 1"), "{fadt}");

        for needle in [
            "Device (PCI0)",
            "EisaId (\"PNP0A08\")",
            "EisaId (\"PNP0A03\")",
            "WordBusNumber (ResourceProducer",
            "0x0CF8,             // Range Minimum",
            "DWordMemory (ResourceProducer",
            "QWordMemory (ResourceProducer",
            "Name (_PRT, Package (0x7C)",
            "EisaId (\"PNP0C02\")",
        ] {
            assert!(dsdt.contains(needle), "DSDT lacks {needle:?}:\n{dsdt}");
        }

        let mcfg = dsl(&all, "MCFG");
        assert!(mcfg.contains("Base Address : 00000000E0000000"), "{mcfg}");
        assert!(mcfg.contains("End Bus Number : 00"), "{mcfg}");

        let madt = dsl(&all, "APIC");
        assert!(madt.contains("PC-AT Compatibility : 1"), "{madt}");
        assert!(madt.contains("[Interrupt Source Override]"), "{madt}");
        let x2apic = madt.matches("[Processor Local x2APIC]").count();
        assert_eq!(x2apic, (cpus as usize).saturating_sub(255), "{madt}");
    }
}

#[test]
fn iasl_disassembles_minimal_platform() {
    if !have_iasl() {
        return;
    }
    let bare = AcpiConfig {
        serial: None,
        i8042: false,
        rtc: None,
        ..cfg(1)
    };
    let all = disassemble_all(&AcpiConfig { pci: None, ..bare });
    assert!(all.iter().all(|(name, _)| name != "MCFG"));
    let dsdt = dsl(&all, "DSDT");
    assert!(!dsdt.contains("PCI0"));
    assert!(!dsdt.contains("PNP0501") && !dsdt.contains("PNP0303") && !dsdt.contains("PNP0B00"));
    assert!(dsl(&all, "FACP").contains("CMOS RTC Not Present (V5) : 1"));
}

#[test]
fn flags_a_corrupt_table() {
    if !have_iasl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build(&cfg(1)).unwrap().dump(dir.path()).unwrap();
    let path = dir.path().join("DSDT.dat");
    let mut dsdt = std::fs::read(&path).unwrap();
    dsdt[40] ^= 0x80; // inside the AML body: breaks the checksum
    std::fs::write(&path, dsdt).unwrap();
    assert!(disassemble(dir.path(), "DSDT").is_err());
}

#[test]
fn power_button_event_device_disassembles() {
    if !have_iasl() {
        return;
    }
    let all = disassemble_all(&cfg(1));
    let dsdt = dsl(&all, "DSDT");
    for needle in [
        "\"ACPI0013\"",
        "EisaId (\"PNP0C0C\")",
        "SystemMemory, 0xFEB00000, 0x04",
        "Method (_EVT, 1, Serialized)",
        "Notify (\\_SB.PWRB, 0x80)",
    ] {
        assert!(dsdt.contains(needle), "missing {needle}:\n{dsdt}");
    }
    let without = disassemble_all(&AcpiConfig {
        ged: None,
        ..cfg(1)
    });
    assert!(!dsl(&without, "DSDT").contains("ACPI0013"));
}

#[test]
fn pci_hotplug_slots_and_controller_disassemble() {
    if !have_iasl() {
        return;
    }
    let all = disassemble_all(&cfg(2));
    let dsdt = dsl(&all, "DSDT");
    for needle in [
        "Device (PHPR)",
        "EisaId (\"PNP0A06\")",
        "SystemMemory, 0xFEB01000, 0x0C",
        "PCIU,   32",
        "PCID,   32",
        "B0EJ,   32",
        "Method (PCEJ, 1, Serialized)",
        "B0EJ = Local0",
        "Method (PCNT, 0, Serialized)",
        "Local0 = \\_SB.PHPR.PCIU",
        "Local1 = \\_SB.PHPR.PCID",
        "DVNT (Local0, One)",
        "DVNT (Local1, 0x03)",
        "Method (DVNT, 2, NotSerialized)",
        "Notify (S01, Arg1)",
        "Notify (S31, Arg1)",
        "\\_SB.PCI0.PCNT ()",
    ] {
        assert!(dsdt.contains(needle), "missing {needle}:\n{dsdt}");
    }
    // One slot device per hot-pluggable slot, each with its address, number and eject method.
    assert_eq!(dsdt.matches("Method (_EJ0, 1, NotSerialized)").count(), 31);
    assert_eq!(dsdt.matches("\\_SB.PHPR.PCEJ (_SUN)").count(), 31);
    assert!(dsdt.contains("Device (S05)"), "{dsdt}");
    assert!(dsdt.contains("Name (_ADR, 0x00050000)"), "{dsdt}");
    assert!(dsdt.contains("Name (_SUN, 0x05)"), "{dsdt}");

    let without = disassemble_all(&AcpiConfig {
        pci_hotplug: None,
        ..cfg(2)
    });
    let dsdt = dsl(&without, "DSDT");
    assert!(!dsdt.contains("PHPR") && !dsdt.contains("_EJ0") && !dsdt.contains("PCNT"));
    // Without PCI there is nothing to hot-plug into: no controller, and the GED does not call
    // into a PCI0 that does not exist.
    let no_pci = disassemble_all(&AcpiConfig {
        pci: None,
        ..cfg(2)
    });
    let dsdt = dsl(&no_pci, "DSDT");
    assert!(!dsdt.contains("PHPR") && !dsdt.contains("PCNT"));
}
