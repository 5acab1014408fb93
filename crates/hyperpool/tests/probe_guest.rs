//! The built-in probe guest on real KVM: what it sees of CPUs, memory and ACPI, and how each way
//! of ending a VM maps to the VMM's exit status.

mod common;

use common::*;
use std::time::Duration;

fn probe(extra: &[&str], cmdline: &str) -> Finished {
    let mut args = vec!["run", "--serial", "tty", "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run(&args, PROBE_LIMIT)
}

#[test]
fn every_vcpu_comes_up() {
    if !kvm_available() {
        return;
    }
    for n in [1, 2, 4] {
        let f = probe(
            &["--cpus", &n.to_string(), "--memory", "128M"],
            "probe=cpus",
        );
        assert_eq!(
            f.probe_ok("cpus"),
            format!("madt={n} up={n}"),
            "{}",
            f.describe()
        );
        assert!(f.stdout.contains("PROBE done"), "{}", f.describe());
        assert_eq!(f.code(), 0, "poweroff exits 0\n{}", f.describe());
    }
}

#[test]
fn memory_map_matches_e820_small_and_above_4g() {
    if !kvm_available() {
        return;
    }
    let f = probe(&["--memory", "128M"], "probe=mem");
    let figures = f.probe_ok("mem");
    assert!(figures.contains("0x0-0x9fc00"), "{figures}");
    assert!(figures.contains("0x100000-0x8000000"), "{figures}");
    assert!(!figures.contains("0x100000000-"), "{figures}");
    assert_eq!(f.code(), 0);

    let f = probe(&["--memory", "4G"], "probe=mem");
    let figures = f.probe_ok("mem");
    assert!(
        figures.contains("0x100000-0xc0000000"),
        "RAM stops at the hole: {figures}"
    );
    assert!(
        figures.contains("0x100000000-0x140000000"),
        "1 GiB above 4 GiB: {figures}"
    );
    assert!(figures.contains("regions=3"), "{figures}");
    assert_eq!(f.code(), 0);
}

#[test]
fn acpi_tables_are_valid_and_complete() {
    if !kvm_available() {
        return;
    }
    let f = probe(&["--cpus", "2"], "probe=acpi,cmdline marker=xyz");
    let figures = f.probe_ok("acpi");
    assert!(figures.starts_with("rsdp=0xe0000"), "{figures}");
    for sig in ["FACP", "APIC", "DSDT"] {
        assert!(figures.contains(sig), "{sig} missing: {figures}");
    }
    assert!(f.probe_ok("cmdline").contains("marker=xyz"));
    assert_eq!(f.code(), 0);
}

#[test]
fn ring3_runs_heavy_loops() {
    if !kvm_available() {
        return;
    }
    let f = probe(&[], "probe=ring3");
    assert!(
        f.probe_ok("ring3").starts_with("iters=100000000 ms="),
        "{}",
        f.describe()
    );
}

#[test]
fn reset_and_debug_exit_and_triple_fault() {
    if !kvm_available() {
        return;
    }
    let f = probe(&[], "probe=cmdline probe.end=reset");
    assert_eq!(f.code(), 0, "i8042 reset exits 0\n{}", f.describe());
    assert!(f.stdout.contains("PROBE done"));

    let f = probe(&[], "probe=cmdline probe.end=acpi-reset");
    assert_eq!(f.code(), 0, "ACPI reset exits 0\n{}", f.describe());

    let f = probe(&[], "probe=cmdline probe.end=exit:5");
    assert_eq!(f.code(), 11, "debug-exit (5 << 1) | 1\n{}", f.describe());

    let f = probe(&[], "probe=cmdline probe.end=triple");
    assert_eq!(f.code(), 4, "a triple fault is fatal\n{}", f.describe());
    assert!(f.stderr.contains("triple fault"), "{}", f.describe());
    assert!(
        f.stderr.contains("rip="),
        "registers reported\n{}",
        f.describe()
    );
}

#[test]
fn reboot_restarts_when_asked_and_sigterm_stops_cleanly() {
    if !kvm_available() {
        return;
    }
    let (mut child, lines) = spawn_lines(&[
        "run",
        "--on-reboot",
        "restart",
        "--cmdline",
        "probe=cmdline probe.end=reset",
    ]);
    let mut boots = 0;
    while boots < 3 {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the guest keeps rebooting");
        if line.contains("hyperpool-probe: start") {
            boots += 1;
        }
    }
    let status = terminate(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean stop");
}

#[test]
fn idle_guest_stops_on_sigterm() {
    if !kvm_available() {
        return;
    }
    let (mut child, lines) = spawn_lines(&[
        "run",
        "--cpus",
        "2",
        "--cmdline",
        "probe=cmdline probe.end=halt",
    ]);
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("probe output");
        if line.contains("PROBE done") {
            break;
        }
    }
    let status = terminate(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn stray_interrupt_is_reported_with_its_vector() {
    if !kvm_available() {
        return;
    }
    // IDT vectors nobody installed are not-present gates: the #NP handler must name the vector.
    let (mut child, lines) = spawn_lines(&["run", "--cmdline", "probe=stray-irq"]);
    let mut seen = Vec::new();
    let report = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no #NP report; output so far:\n{}", seen.join("\n")));
        if line.contains("PROBE unexpected interrupt") || line.contains("PROBE stray-irq") {
            break line;
        }
        seen.push(line);
    };
    assert!(
        report.contains("PROBE unexpected interrupt vector=96 (0x60)"),
        "{report}"
    );
    let next = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the exception line");
    assert!(next.contains("PROBE exception vector=11 "), "{next}");
    terminate(&mut child, Duration::from_secs(10));
}

#[test]
fn serial_to_file_and_off() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let spec = format!("file={}", path.display());
    let f = run(
        &["run", "--serial", &spec, "--cmdline", "probe=cmdline"],
        PROBE_LIMIT,
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
    assert!(!f.stdout.contains("PROBE"), "nothing on stdout");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("PROBE cmdline ok probe=cmdline"), "{log}");

    let f = run(
        &["run", "--serial", "off", "--cmdline", "probe=cmdline"],
        PROBE_LIMIT,
    );
    assert_eq!(f.code(), 0);
    assert!(!f.stdout.contains("PROBE"));
}

#[test]
fn dumped_acpi_tables_disassemble_with_iasl() {
    if !kvm_available() {
        return;
    }
    let iasl = std::process::Command::new("iasl").arg("-v").output();
    if iasl.is_err() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "iasl (acpica-tools) missing in CI"
        );
        eprintln!("skipping: iasl not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let f = run(
        &[
            "run",
            "--cpus",
            "4",
            "--dump-acpi",
            d,
            "--cmdline",
            "probe=acpi",
        ],
        PROBE_LIMIT,
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
    for table in ["DSDT", "FACP", "APIC", "XSDT"] {
        let file = dir.path().join(format!("{table}.dat"));
        assert!(file.exists(), "{table} dumped");
        let out = std::process::Command::new("iasl")
            .current_dir(dir.path())
            .args(["-d", file.to_str().unwrap()])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {table}: {text}");
        assert!(!text.contains("Error"), "iasl -d {table}: {text}");
    }
    let madt = std::fs::read_to_string(dir.path().join("APIC.dsl")).unwrap();
    assert_eq!(madt.matches("Processor Local APIC").count(), 4, "{madt}");
}

#[test]
fn multiboot_kernel_gets_magic_memory_map_and_cmdline() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let f = run(&["guest", "probe", d], PROBE_LIMIT);
    assert_eq!(f.code(), 0, "{}", f.describe());
    let kernel = dir.path().join("tiny-multiboot.elf");
    let f = run(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "mb=1",
        ],
        PROBE_LIMIT,
    );
    assert!(
        f.stdout.contains("hyperpool-tiny-multiboot"),
        "{}",
        f.describe()
    );
    assert!(f.stderr.contains("as Multiboot"), "{}", f.describe());
    assert_eq!(
        f.code(),
        33,
        "0x10 = magic and info flags right\n{}",
        f.describe()
    );
}

#[test]
fn pci_bus_and_virtio_rng_serve_an_independent_driver() {
    if !kvm_available() {
        return;
    }
    // Without devices: only the host bridge, found through the MCFG's ECAM.
    let f = probe(&[], "probe=pci");
    let figures = f.probe_ok("pci");
    assert!(
        figures.starts_with("devices=1 00:00.0 8086:0d57 060000"),
        "{figures}"
    );

    // With --rng: a modern virtio-rng function with MSI-X, driven by virtio-drivers in the guest.
    let f = probe(&["--rng", "--cpus", "2"], "probe=pci,rng");
    let figures = f.probe_ok("pci");
    assert!(figures.contains("1af4:1044 ff0000 msix"), "{figures}");
    let rng = f.probe_ok("rng");
    assert!(rng.starts_with("bytes=4096 distinct="), "{rng}");
    let distinct: u32 = rng["bytes=4096 distinct=".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(distinct >= 200, "random bytes cover most values: {rng}");
    assert_eq!(f.code(), 0, "{}", f.describe());
}

#[test]
fn virtio_interrupts_reach_a_driver_without_msix_through_level_intx() {
    if !kvm_available() {
        return;
    }
    // The rng in slot 1: INTA# on GSI 17 (the _PRT swizzle), programmed level/active-low in the
    // IOAPIC by the guest. Its handler EOIs without reading the ISR, so the line must come back
    // after every EOI until the guest reads the ISR (queue bit), and then stay quiet.
    let f = probe(&["--rng"], "probe=intx,rng");
    let figures = f.probe_ok("intx");
    assert!(
        figures.starts_with("gsi=17 pin=INTA isr=0x1 reraised=yes quiet=yes "),
        "{}",
        f.describe()
    );
    assert!(figures.contains(" bytes=16 "), "{figures}");
    // The device works as before after the check reset it.
    assert!(
        f.probe_ok("rng").starts_with("bytes=4096"),
        "{}",
        f.describe()
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
}
