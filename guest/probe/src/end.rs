//! Final actions: poweroff (ACPI S5), reset (i8042), acpi-reset (FADT reset register),
//! exit:N (isa-debug-exit), halt, triple (`ud2` with an empty IDT).

use crate::acpi;
use crate::println;
use alloc::string::String;
use x86_64::instructions::port::Port;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndAction {
    Poweroff,
    Reset,
    AcpiReset,
    Exit(u8),
    Halt,
    Triple,
}

impl EndAction {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "poweroff" => Self::Poweroff,
            "reset" => Self::Reset,
            "acpi-reset" => Self::AcpiReset,
            "halt" => Self::Halt,
            "triple" => Self::Triple,
            _ => Self::Exit(s.strip_prefix("exit:")?.parse().ok()?),
        })
    }
}

/// `cli; hlt` forever.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

fn outb(port: u16, v: u8) {
    // SAFETY: only called with the well-known ports of the end actions; the write is the
    // intended side effect (the VM stops).
    unsafe { Port::<u8>::new(port).write(v) }
}

fn poweroff(rsdp: u64) -> Result<(), String> {
    let tables = acpi::tables(rsdp)?;
    let fadt = acpi::fadt(&tables)?;
    let slp_typ = acpi::s5_slp_typ(&tables)?;
    match fadt
        .sleep_control_register()
        .ok()
        .flatten()
        .filter(|r| r.address != 0)
    {
        // Hardware-reduced ACPI: SLP_TYPx in bits 2..4, SLP_EN bit 5.
        Some(reg) => acpi::gas_write(&reg, (((slp_typ & 7) as u64) << 2) | (1 << 5)),
        // Legacy PM1a control: SLP_TYPx bits 10..12, SLP_EN bit 13.
        None => {
            let value = (((slp_typ & 7) as u64) << 10) | (1 << 13);
            match fadt.pm1a_control_block() {
                Ok(reg) if reg.address != 0 => acpi::gas_write(&reg, value),
                // No usable X_PM1a_CNT_BLK: the 32-bit PM1a_CNT_BLK port (FADT offset 64).
                _ => acpi::pm1a_cnt_port_write(fadt.physical_start() as u64, value as u16),
            }
        }
    }
}

fn acpi_reset(rsdp: u64) -> Result<(), String> {
    let tables = acpi::tables(rsdp)?;
    let fadt = acpi::fadt(&tables)?;
    let reg = fadt.reset_register().map_err(|e| alloc::format!("{e:?}"))?;
    let value = fadt.reset_value;
    acpi::gas_write(&reg, value as u64)
}

fn triple_fault() {
    let empty = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::zero(),
    };
    // SAFETY: deliberately loads an empty IDT and raises #UD: #UD → #GP → #DF → shutdown.
    // (`ud2`, not `int3`: PVM's ring-0 emulator cannot emulate `int3`, KVM reports an
    // emulation failure instead of the triple fault.)
    unsafe {
        x86_64::instructions::tables::lidt(&empty);
        core::arch::asm!("ud2");
    }
}

/// Performs `action`; if the VM is still running afterwards, reports FAIL and halts.
pub fn finish(action: EndAction, rsdp: u64) -> ! {
    let (name, result) = match action {
        EndAction::Poweroff => ("poweroff", poweroff(rsdp)),
        EndAction::AcpiReset => ("acpi-reset", acpi_reset(rsdp)),
        EndAction::Reset => {
            outb(0x64, 0xFE);
            ("reset", Ok(()))
        }
        EndAction::Exit(n) => {
            outb(0xf4, n);
            ("exit", Ok(()))
        }
        EndAction::Triple => {
            triple_fault();
            ("triple", Ok(()))
        }
        EndAction::Halt => halt_forever(),
    };
    // Give the VMM a moment to act on the write before declaring failure.
    crate::time::delay_us(100_000);
    match result {
        Ok(()) => println!("PROBE {name} FAIL"),
        Err(e) => println!("PROBE {name} FAIL {e}"),
    }
    halt_forever()
}
