//! The power button of a hardware-reduced ACPI platform: a Generic Event Device (ACPI0013)
//! whose interrupt runs `_EVT`, which reads the pending events from a 32-bit MMIO register
//! (reading clears them) and notifies the power button device (PNP0C0C) for bit 0.
//!
//! ```text
//! Device (GED_) {
//!     _HID "ACPI0013", _UID 0, _CRS { Interrupt (Edge, ActiveHigh) { irq } }
//!     OperationRegion (GDST, SystemMemory, mmio, 4)
//!     Field (GDST, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
//!     Method (_EVT, 1, Serialized) {
//!         Local0 = GDAT
//!         If ((Local0 & 1) == 1) { Notify (\_SB_.PWRB, 0x80) }
//!         If ((Local0 & 2) == 2) { \_SB_.PCI0.PCNT () }    // with PCI hotplug: hotplug.rs
//!     }
//! }
//! Device (PWRB) { _HID PNP0C0C, _UID 0 }
//! ```

use acpi_tables::{Aml, aml};

use crate::bytes::to_vec;
use crate::dsdt::{RawAml, crs};
use crate::hotplug::PCI_HOTPLUG_EVENT;

/// Bit of the GED event register for the power button.
pub const POWER_BUTTON_EVENT: u32 = 1;
/// `Notify` value for "button pressed".
const NOTIFY_PRESSED: u8 = 0x80;

pub(crate) fn ged_device(mmio: u32, irq: u32, pci_hotplug: bool) -> RawAml {
    let interrupt = aml::Interrupt::new(true, true, false, false, irq);
    let crs = crs(vec![&interrupt]);
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &mmio,
        &4u32,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = aml::Path::new("GDAT");
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let masked = aml::And::new(&aml::ZERO, &aml::Local(0), &POWER_BUTTON_EVENT);
    let is_power = aml::Equal::new(&masked, &POWER_BUTTON_EVENT);
    let notify = aml::Notify::new(&pwrb, &NOTIFY_PRESSED);
    let on_power = aml::If::new(&is_power, vec![&notify]);
    let slots_masked = aml::And::new(&aml::ZERO, &aml::Local(0), &PCI_HOTPLUG_EVENT);
    let is_slots = aml::Equal::new(&slots_masked, &PCI_HOTPLUG_EVENT);
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let on_slots = aml::If::new(&is_slots, vec![&scan]);
    let mut body: Vec<&dyn Aml> = vec![&read, &on_power];
    if pci_hotplug {
        body.push(&on_slots);
    }
    let evt = aml::Method::new("_EVT".into(), 1, true, body);
    RawAml(to_vec(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &crs,
            &region,
            &field,
            &evt,
        ],
    )))
}

pub(crate) fn power_button_device() -> RawAml {
    RawAml(to_vec(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )))
}
