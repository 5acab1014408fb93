//! The i8042 keyboard controller, only as far as guests use it to reset the machine.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitRequest, ExitSignal};

/// Fires [`ExitRequest::Reset`] when the guest pulses the reset line.
pub struct ResetLine(Arc<ExitSignal>);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitRequest::Reset);
        Ok(())
    }
}

/// Spans ports 0x60..=0x64 (data at offset 0, command/status at offset 4).
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetLine>,
}

impl I8042 {
    pub const PORT_SPAN: u64 = 5;

    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(ResetLine(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 0 || offset == 4 {
            self.dev.read(offset as u8)
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), 0 | 4) = (data.first(), offset) {
            let Ok(()) = self.dev.write(offset as u8, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulse_reset_requests_a_reset() {
        let exit = Arc::new(ExitSignal::new());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert!(!exit.is_set(), "0xfe on the data port is not a command");
        dev.write(4, &[0xfe]);
        assert_eq!(exit.pending(), Some(ExitRequest::Reset));
    }
}
