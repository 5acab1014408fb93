//! Linux as an independent client of our machine model: Debian's stock kernel must report our e820
//! map, list every ACPI table we built, parse the MADT and count our vCPUs — in its own words.
//!
//! On PVM hosts the kernel runs emulated: these lines take 10-30 s (PVH) or ~90 s (bzImage, whose
//! decompressor is emulated too), so each test stops the VM as soon as it has seen what it needs.

mod common;

use common::debian::debian_guest;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// PVM cannot emulate these; hiding them gets the kernel through its early boot.
const PVM_FEATURES: &str = "features=-cx16,-xsave,-la57";

/// Boots `kernel` until every `wanted` line has appeared (then stops it with SIGTERM).
fn early_boot(kernel: &Path, cpus: u32, wanted: &[String], limit: Duration) -> Vec<String> {
    let cpus_arg = format!("boot={cpus},{PVM_FEATURES}");
    let (mut child, lines) = spawn_lines(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        &cpus_arg,
        "--memory",
        "512M",
        "--cmdline",
        "console=ttyS0 earlyprintk=ttyS0",
    ]);
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut missing: Vec<&String> = wanted.iter().collect();
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                missing.retain(|w| !line.contains(w.as_str()));
                seen.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "after {limit:?} the kernel had not printed {missing:?}\n--- its log ---\n{}",
                    seen.join("\n")
                );
            }
        }
    }
    let status = terminate(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "SIGTERM stops the VM cleanly");
    seen
}

fn expectations(cpus: u32) -> Vec<String> {
    [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "ACPI: MCFG 0x",
        "IOAPIC[0]: apic_id 0",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("smpboot: Allowing {cpus} CPUs")])
    .collect()
}

#[test]
fn debian_vmlinux_pvh_sees_our_machine_with_1_and_4_cpus() {
    if !kvm_available() {
        return;
    }
    let Some(dir) = debian_guest() else { return };
    for cpus in [1, 4] {
        early_boot(
            &dir.join("vmlinux"),
            cpus,
            &expectations(cpus),
            Duration::from_secs(150),
        );
    }
}

#[test]
fn debian_bzimage_sees_our_machine() {
    if !kvm_available() {
        return;
    }
    let Some(dir) = debian_guest() else { return };
    early_boot(
        &dir.join("vmlinuz"),
        2,
        &expectations(2),
        Duration::from_secs(600),
    );
}
