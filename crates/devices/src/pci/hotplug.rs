//! The PCI hotplug controller: the registers the DSDT's hotplug AML (`hyperpool_acpi`'s
//! `PHPR` device and the slot devices under `PCI0`) reads and writes. The design is Cloud
//! Hypervisor's ACPI hotplug: the host sets a slot's bit in "slots up" or "slots down" and raises
//! the GED's PCI hotplug event; the guest's `_EVT` reads both bitmaps (reading clears them) and
//! `Notify`s each slot device (1 = device check, 3 = eject request); the guest's `_EJ0` of a slot
//! writes its bit to the eject register once the OS has let go of the function.
//!
//! Registers, 32-bit each, little endian; only aligned 4-byte accesses take effect:
//!
//! | offset | name | read                          | write                            |
//! |--------|------|-------------------------------|----------------------------------|
//! | 0x0    | PCIU | slots plugged since last read | ignored                          |
//! | 0x4    | PCID | slots to remove since last read | ignored                        |
//! | 0x8    | B0EJ | 0                             | bit n set: the guest ejected slot n |
//!
//! An eject only takes for a slot the host asked to remove and that the guest has not ejected
//! yet: a guest writing the register at will cannot make a device vanish, nor report an empty
//! slot. The host learns of accepted ejects through [`PciHotplug::on_eject`]'s callback.

use crate::bus::BusDevice;
use crate::pci::segment::NUM_SLOTS;

/// Register offsets.
pub const PCIU: u64 = 0x0;
pub const PCID: u64 = 0x4;
pub const B0EJ: u64 = 0x8;

/// Slots a hotplug can use: 1..31 (slot 0 is the host bridge).
const HOTPLUG_SLOTS: u32 = !1;
const _: () = assert!(NUM_SLOTS == 32);

/// Called with the bitmap of slots the guest has just ejected (never 0).
pub type EjectNotifier = Box<dyn Fn(u32) + Send>;

#[derive(Default)]
pub struct PciHotplug {
    up: u32,
    down: u32,
    /// Slots the host asked to remove that the guest has not ejected yet.
    removing: u32,
    on_eject: Option<EjectNotifier>,
}

impl PciHotplug {
    /// Bytes of MMIO the registers take.
    pub const SIZE: u64 = 12;

    pub fn new() -> Self {
        Self::default()
    }

    /// Who is told about ejects. Until this is set no removal can be pending (the host asks
    /// for removals through the same owner), so none is lost.
    pub fn on_eject(&mut self, notify: EjectNotifier) {
        self.on_eject = Some(notify);
    }

    /// A function was plugged into `slot`: the guest's next scan sends it a device check. A
    /// removal still pending for the slot is forgotten (the slot holds a new device).
    pub fn plugged(&mut self, slot: u8) {
        let bit = slot_bit(slot);
        self.up |= bit;
        self.down &= !bit;
        self.removing &= !bit;
    }

    /// The host wants the function in `slot` gone: the guest's next scan sends it an eject
    /// request, and its eject of the slot is then accepted.
    pub fn request_removal(&mut self, slot: u8) {
        let bit = slot_bit(slot);
        self.down |= bit;
        self.up &= !bit;
        self.removing |= bit;
    }

    /// Whether a removal of `slot` was asked for and not yet ejected.
    pub fn removal_pending(&self, slot: u8) -> bool {
        self.removing & slot_bit(slot) != 0
    }
}

/// The bit of `slot` if it can be hot-plugged, else 0 (so nothing happens).
fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0) & HOTPLUG_SLOTS
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let value = match offset {
            PCIU => std::mem::take(&mut self.up),
            PCID => std::mem::take(&mut self.down),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (B0EJ, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) else {
            return;
        };
        let asked = u32::from_le_bytes(bytes);
        let ejected = asked & self.removing;
        if asked & !ejected != 0 {
            tracing::debug!(
                "PCI hotplug: the guest ejected slots {:#x} that are not being removed: ignored",
                asked & !ejected
            );
        }
        if ejected != 0 {
            self.removing &= !ejected;
            match &self.on_eject {
                Some(notify) => notify(ejected),
                None => {
                    tracing::warn!("PCI hotplug: slots {ejected:#x} ejected with nobody to tell")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn rig() -> (PciHotplug, Arc<Mutex<Vec<u32>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut dev = PciHotplug::new();
        dev.on_eject(Box::new(move |slots| log.lock().unwrap().push(slots)));
        (dev, seen)
    }

    fn read(dev: &mut PciHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn eject(dev: &mut PciHotplug, slots: u32) {
        dev.write(B0EJ, &slots.to_le_bytes());
    }

    #[test]
    fn plug_and_removal_bitmaps_are_read_once() {
        let (mut dev, seen) = rig();
        dev.plugged(5);
        dev.plugged(7);
        assert_eq!(read(&mut dev, PCIU), (1 << 5) | (1 << 7));
        assert_eq!(read(&mut dev, PCIU), 0, "reading clears");
        dev.request_removal(5);
        assert!(dev.removal_pending(5));
        assert_eq!(read(&mut dev, PCID), 1 << 5);
        assert_eq!(read(&mut dev, PCID), 0);
        assert_eq!(read(&mut dev, B0EJ), 0);
        eject(&mut dev, 1 << 5);
        assert_eq!(*seen.lock().unwrap(), vec![1 << 5]);
        assert!(!dev.removal_pending(5));
        eject(&mut dev, 1 << 5);
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "a second eject is not reported"
        );
    }

    #[test]
    fn hostile_accesses_change_nothing() {
        let (mut dev, seen) = rig();
        dev.plugged(3);
        dev.request_removal(4);
        // Ejects of slots never removed, of the host bridge, of everything.
        eject(&mut dev, 1 << 3);
        eject(&mut dev, 1);
        assert!(seen.lock().unwrap().is_empty());
        // Partial and unaligned accesses neither eject nor clear.
        dev.write(B0EJ, &[0x10]);
        dev.write(B0EJ + 1, &[0; 4]);
        dev.write(B0EJ, &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        dev.write(PCIU, &u32::MAX.to_le_bytes());
        dev.write(1 << 40, &u32::MAX.to_le_bytes());
        let mut byte = [0u8; 1];
        dev.read(PCIU, &mut byte);
        assert_eq!(byte, [0]);
        let mut far = [0xffu8; 4];
        dev.read(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(read(&mut dev, PCIU), 1 << 3);
        assert_eq!(read(&mut dev, PCID), 1 << 4);
        // Everything at once takes only the slot being removed.
        eject(&mut dev, u32::MAX);
        assert_eq!(*seen.lock().unwrap(), vec![1 << 4]);
        // Slots out of range do nothing.
        dev.plugged(32);
        dev.request_removal(200);
        dev.plugged(0);
        assert_eq!(read(&mut dev, PCIU), 0);
        assert_eq!(read(&mut dev, PCID), 0);
    }

    #[test]
    fn plugging_a_slot_again_cancels_its_removal() {
        let (mut dev, seen) = rig();
        dev.request_removal(9);
        dev.plugged(9);
        assert_eq!(read(&mut dev, PCID), 0);
        assert_eq!(read(&mut dev, PCIU), 1 << 9);
        eject(&mut dev, 1 << 9);
        assert!(seen.lock().unwrap().is_empty());
    }
}
