//! ACPI PCI hotplug (Cloud Hypervisor's design): the hotplug controller's registers as an
//! operation region, one device per slot under the root bridge, and the scan the GED's `_EVT`
//! runs on its PCI hotplug event.
//!
//! ```text
//! Device (PHPR) {                          // in \_SB_: the controller
//!     _HID PNP0A06, _UID "PCI Hotplug Controller", _STA 0x0B, _CRS { Memory32Fixed regs }
//!     OperationRegion (PCST, SystemMemory, mmio, 12)
//!     Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, B0EJ, 32 }
//!     Method (PCEJ, 1, Serialized) { B0EJ = 1 << Arg0 }   // eject slot Arg0
//! }
//! Device (PCI0) {
//!     ...
//!     Device (S01_) { _ADR 0x00010000, _SUN 1, Method (_EJ0, 1) { \_SB_.PHPR.PCEJ (_SUN) } }
//!     ...                                  // one per slot 1..31
//!     Method (PCNT, 0, Serialized) {       // the GED's _EVT calls this
//!         Local0 = \_SB_.PHPR.PCIU; Local1 = \_SB_.PHPR.PCID   // reading clears them
//!         DVNT (Local0, 1); DVNT (Local1, 3)                    // device check, eject request
//!     }
//!     Method (DVNT, 2) { If (Arg0 & (1 << n)) { Notify (Snn_, Arg1) } ... }
//! }
//! ```

use acpi_tables::{Aml, aml};

use crate::bytes::to_vec;
use crate::dsdt::{RawAml, crs};

/// Bit of the GED event register for "PCI slots changed".
pub const PCI_HOTPLUG_EVENT: u32 = 2;
/// Bytes of the controller's registers.
const REGS_LEN: u32 = 12;
/// `_STA`: present, enabled, functioning, not shown in UI.
const STA_HIDDEN: u8 = 0x0B;
/// `Notify` values for a slot device (ACPI 6.4 §5.6.6).
const DEVICE_CHECK: u8 = 1;
const EJECT_REQUEST: u8 = 3;
/// Hot-pluggable slots: 1..31 (0 is the host bridge).
pub(crate) const SLOTS: std::ops::Range<u8> = 1..32;

/// The AML name of slot `slot`'s device: `S01_` .. `S31_`.
fn slot_name(slot: u8) -> String {
    format!("S{slot:02}_")
}

/// The controller device, `\_SB_.PHPR`.
pub(crate) fn controller(mmio: u32) -> RawAml {
    let region = aml::OpRegion::new(
        "PCST".into(),
        aml::OpRegionSpace::SystemMemory,
        &mmio,
        &REGS_LEN,
    );
    let field = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let mask = aml::ShiftLeft::new(&aml::Local(0), &aml::ONE, &aml::Arg(0));
    let b0ej = aml::Path::new("B0EJ");
    let eject = aml::Store::new(&b0ej, &aml::Local(0));
    let pcej = aml::Method::new("PCEJ".into(), 1, true, vec![&mask, &eject]);
    let sta_value = aml::Return::new(&STA_HIDDEN);
    let sta = aml::Method::new("_STA".into(), 0, false, vec![&sta_value]);
    let regs = aml::Memory32Fixed::new(true, mmio, REGS_LEN);
    RawAml(to_vec(&aml::Device::new(
        "PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &"PCI Hotplug Controller"),
            &sta,
            &crs(vec![&regs]),
            &region,
            &field,
            &pcej,
        ],
    )))
}

/// What goes inside `PCI0`: the slot devices and the scan methods.
pub(crate) fn root_bridge_children() -> Vec<RawAml> {
    let mut out: Vec<RawAml> = SLOTS.map(slot_device).collect();
    out.push(scan_method());
    out.push(notify_method());
    out
}

fn slot_device(slot: u8) -> RawAml {
    // _ADR: device number in the high word, function 0.
    let address = u32::from(slot) << 16;
    let sun = aml::Path::new("_SUN");
    let call = aml::MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun as &dyn Aml]);
    let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&call]);
    RawAml(to_vec(&aml::Device::new(
        slot_name(slot).as_str().into(),
        vec![
            &aml::Name::new("_ADR".into(), &address),
            &aml::Name::new("_SUN".into(), &u32::from(slot)),
            &ej0,
        ],
    )))
}

/// `PCNT`: reads (and so clears) both bitmaps and notifies the slots in them.
fn scan_method() -> RawAml {
    let (pciu, pcid) = (
        aml::Path::new("\\_SB_.PHPR.PCIU"),
        aml::Path::new("\\_SB_.PHPR.PCID"),
    );
    let up = aml::Store::new(&aml::Local(0), &pciu);
    let down = aml::Store::new(&aml::Local(1), &pcid);
    let check = aml::MethodCall::new(
        "DVNT".into(),
        vec![&aml::Local(0) as &dyn Aml, &DEVICE_CHECK],
    );
    let eject = aml::MethodCall::new(
        "DVNT".into(),
        vec![&aml::Local(1) as &dyn Aml, &EJECT_REQUEST],
    );
    RawAml(to_vec(&aml::Method::new(
        "PCNT".into(),
        0,
        true,
        vec![&up, &down, &check, &eject],
    )))
}

/// `DVNT (bitmap, value)`: `Notify (Snn_, value)` for every slot whose bit is set.
fn notify_method() -> RawAml {
    let per_slot: Vec<RawAml> = SLOTS
        .map(|slot| {
            let bit = 1u32 << slot;
            let test = aml::And::new(&aml::ZERO, &aml::Arg(0), &bit);
            let is_set = aml::Equal::new(&test, &bit);
            let name = aml::Path::new(&slot_name(slot));
            let notify = aml::Notify::new(&name, &aml::Arg(1));
            RawAml(to_vec(&aml::If::new(&is_set, vec![&notify])))
        })
        .collect();
    RawAml(to_vec(&aml::Method::new(
        "DVNT".into(),
        2,
        false,
        per_slot.iter().map(|s| s as &dyn Aml).collect(),
    )))
}
