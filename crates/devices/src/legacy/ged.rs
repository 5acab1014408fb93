//! The Generic Event Device behind the ACPI power button and PCI hotplug: the host sets an event
//! bit and raises the GED's interrupt; the guest's `_EVT` method reads the 32-bit event register,
//! which clears it, and notifies the matching ACPI device or runs the PCI slot scan (see the
//! DSDT's `GED_`).

use crate::bus::BusDevice;
use crate::irq::IrqLine;

pub struct Ged {
    irq: IrqLine,
    pending: u32,
}

impl Ged {
    /// Bytes of MMIO the event register takes.
    pub const SIZE: u64 = 4;
    /// Event bit: the power button was pressed.
    pub const POWER_BUTTON: u32 = 1;
    /// Event bit: PCI slots were plugged or are to be removed (the hotplug controller says which).
    pub const PCI_HOTPLUG: u32 = 2;

    pub fn new(irq: IrqLine) -> Self {
        Self { irq, pending: 0 }
    }

    /// Records `event` and interrupts the guest.
    pub fn notify(&mut self, event: u32) -> std::io::Result<()> {
        self.pending |= event;
        self.irq.raise()
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // Only an aligned read of the whole register takes (and clears) the events, so a stray
        // byte read cannot swallow half of them.
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.pending.to_le_bytes());
            self.pending = 0;
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_takes_the_pending_events_once() {
        let irq = IrqLine::new(5).unwrap();
        let mut ged = Ged::new(irq.clone());
        ged.notify(Ged::POWER_BUTTON).unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 1, "interrupt raised");
        let mut byte = [0u8; 1];
        ged.read(0, &mut byte);
        assert_eq!(byte, [0], "partial reads see nothing and clear nothing");
        let mut reg = [0u8; 4];
        ged.read(0, &mut reg);
        assert_eq!(u32::from_le_bytes(reg), Ged::POWER_BUTTON);
        ged.read(0, &mut reg);
        assert_eq!(u32::from_le_bytes(reg), 0, "cleared by the first read");
        ged.write(0, &[0xff; 4]);
        ged.read(0, &mut reg);
        assert_eq!(u32::from_le_bytes(reg), 0, "writes do nothing");
    }
}
