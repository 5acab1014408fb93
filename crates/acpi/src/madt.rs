//! MADT (`APIC`): local APICs (xAPIC or x2APIC entries), one IOAPIC, and the
//! ISA IRQ0 -> GSI2 override for the PIT.
//!
//! `acpi_tables` 0.2 provides the MADT header, `ProcessorLocalApic` and
//! `IoApic`, but neither the x2APIC nor the Interrupt Source Override entry,
//! and it hardwires the header flags to 0 and the revision to 1. The two
//! missing entries are defined here as zerocopy structs and added with
//! `MADT::add_structure` (the crate's extension point); flags and revision are
//! patched in the serialised header and the checksum recomputed.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::{Aml, AmlSink};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::bytes::{fix_sdt_checksum, to_vec};
use crate::{AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// MADT header `Flags` bit: the system also has dual 8259 PICs, which the OS
/// must mask before using the IOAPIC.
pub(crate) const PCAT_COMPAT: u32 = 1;
/// MADT revision for ACPI 6.2+ (the x2APIC entry needs revision >= 3).
pub(crate) const REVISION: u8 = 5;
const REVISION_OFFSET: usize = 8;
const FLAGS_OFFSET: usize = 40;

/// APIC ids from this value up can only be described by x2APIC entries
/// (0xFF is the xAPIC broadcast id).
pub(crate) const FIRST_X2APIC_ID: u32 = 0xFF;

/// Processor Local x2APIC Structure (type 9, ACPI 6.5 §5.2.12.12).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
pub(crate) struct LocalX2Apic {
    r#type: u8,
    length: u8,
    _reserved: U16<LE>,
    x2apic_id: U32<LE>,
    flags: U32<LE>,
    processor_uid: U32<LE>,
}

impl LocalX2Apic {
    pub(crate) fn new(x2apic_id: u32, processor_uid: u32, status: EnabledStatus) -> Self {
        Self {
            r#type: 9,
            length: core::mem::size_of::<Self>() as u8,
            _reserved: 0.into(),
            x2apic_id: x2apic_id.into(),
            flags: (status as u32).into(),
            processor_uid: processor_uid.into(),
        }
    }
}

impl Aml for LocalX2Apic {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Interrupt Source Override Structure (type 2, ACPI 6.5 §5.2.12.5).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
pub(crate) struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

impl InterruptSourceOverride {
    /// ISA `irq` delivered on `gsi`, with bus-conforming polarity and trigger.
    pub(crate) fn isa(irq: u8, gsi: u32) -> Self {
        Self {
            r#type: 2,
            length: core::mem::size_of::<Self>() as u8,
            bus: 0, // ISA
            source: irq,
            gsi: gsi.into(),
            flags: 0.into(), // conforms to the ISA bus: edge, active high
        }
    }
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

const _: () = assert!(core::mem::size_of::<LocalX2Apic>() == 16);
const _: () = assert!(core::mem::size_of::<InterruptSourceOverride>() == 10);

/// Builds the MADT. vCPU `n` has APIC id `n` and ACPI processor UID `n`
/// (matching the `_UID` of its DSDT processor device).
pub(crate) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(cfg.lapic_addr),
    );
    for id in 0..cfg.cpus {
        match u8::try_from(id) {
            Ok(id8) if id < FIRST_X2APIC_ID => {
                madt.add_structure(ProcessorLocalApic::new(id8, id8, EnabledStatus::Enabled));
            }
            _ => madt.add_structure(LocalX2Apic::new(id, id, EnabledStatus::Enabled)),
        }
    }
    madt.add_structure(IoApic::new(
        cfg.ioapic_id,
        cfg.ioapic_addr,
        cfg.ioapic_gsi_base,
    ));
    // The PIT is wired to ISA IRQ0 but arrives at IOAPIC pin 2.
    madt.add_structure(InterruptSourceOverride::isa(0, 2));

    let mut bytes = to_vec(&madt);
    bytes[REVISION_OFFSET] = REVISION;
    bytes[FLAGS_OFFSET..FLAGS_OFFSET + 4].copy_from_slice(&PCAT_COMPAT.to_le_bytes());
    fix_sdt_checksum(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x2apic_entry_layout() {
        let e = LocalX2Apic::new(0x1234_5678, 0x9abc_def0, EnabledStatus::Enabled);
        assert_eq!(
            e.as_bytes(),
            [
                9, 16, 0, 0, 0x78, 0x56, 0x34, 0x12, 1, 0, 0, 0, 0xf0, 0xde, 0xbc, 0x9a
            ]
        );
    }

    #[test]
    fn iso_entry_layout() {
        let e = InterruptSourceOverride::isa(0, 2);
        assert_eq!(e.as_bytes(), [2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    }
}
