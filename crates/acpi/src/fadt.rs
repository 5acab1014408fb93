//! FADT (`FACP`): an ACPI 6.5 hardware-reduced platform whose sleep and reset
//! registers are single-byte I/O ports emulated by the VMM.

use acpi_tables::fadt::{FADT, FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use crate::bytes::to_vec;
use crate::{AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Length of the ACPI 6.x FADT as laid out by `acpi_tables`.
pub(crate) const LEN: usize = 276;
const _: () = assert!(core::mem::size_of::<FADTBuilder>() == LEN);

/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`, ACPI 6.5 table 5.11).
pub(crate) mod iapc_boot_arch {
    /// The motherboard has user-visible ISA/LPC devices (UART, RTC, ...).
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    /// An i8042 (or equivalent) keyboard controller is present.
    pub const I8042: u16 = 1 << 1;
    /// VGA is not present: do not probe its legacy I/O and memory.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// There is no CMOS RTC at the legacy ports.
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// One byte-wide register in I/O space.
fn io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn boot_arch_flags(cfg: &AcpiConfig) -> u16 {
    use iapc_boot_arch::*;
    let mut flags = VGA_NOT_PRESENT;
    if cfg.serial.is_some() || cfg.rtc.is_some() || cfg.i8042 {
        flags |= LEGACY_DEVICES;
    }
    if cfg.i8042 {
        flags |= I8042;
    }
    if cfg.rtc.is_none() {
        flags |= CMOS_RTC_NOT_PRESENT;
    }
    flags
}

/// Builds the FADT pointing (64-bit `X_DSDT` only) at the DSDT.
pub(crate) fn build(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    // `FADTBuilder` has setters for only some fields; the rest are public
    // fields of the `acpi_tables` layout, set before `finalize` checksums it.
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .preferred_pm_profile(PmProfile::Unspecified)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = boot_arch_flags(cfg).into();
    fadt.reset_reg = io_byte(cfg.reset_port);
    fadt.reset_value = cfg.reset_value;
    fadt.sleep_control_reg = io_byte(cfg.sleep_control_port);
    fadt.sleep_status_reg = io_byte(cfg.sleep_status_port);
    let fadt: FADT = fadt.finalize();
    to_vec(&fadt)
}
