//! The hardware-reduced ACPI sleep control/status and reset registers that the FADT points to.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitRequest, ExitSignal};

/// Three one-byte registers at consecutive ports: sleep control, sleep status, reset.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    s5_sleep_type: u8,
    reset_value: u8,
    warned: bool,
}

impl AcpiPm {
    pub const PORT: u16 = 0x600;
    pub const PORT_SPAN: u64 = 3;
    pub const SLEEP_CONTROL: u64 = 0;
    pub const SLEEP_STATUS: u64 = 1;
    pub const RESET: u64 = 2;
    const SLP_EN: u8 = 1 << 5;
    const WAK_STS: u8 = 1 << 7;

    pub fn new(exit: Arc<ExitSignal>, s5_sleep_type: u8, reset_value: u8) -> Self {
        Self {
            exit,
            s5_sleep_type,
            reset_value,
            warned: false,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Always awake: a guest polling WAK_STS after a sleep request that we refused moves on.
        let v = if offset == Self::SLEEP_STATUS {
            Self::WAK_STS
        } else {
            0
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            Self::SLEEP_CONTROL if v & Self::SLP_EN != 0 => {
                let sleep_type = (v >> 2) & 0x7;
                if sleep_type == self.s5_sleep_type {
                    self.exit.request(ExitRequest::Poweroff);
                } else if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(
                        "guest asked for ACPI sleep type {sleep_type}; only S5 is supported"
                    );
                }
            }
            Self::RESET if v == self.reset_value => self.exit.request(ExitRequest::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (AcpiPm, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new());
        (AcpiPm::new(exit.clone(), 5, 1), exit)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, exit) = dev();
        pm.write(AcpiPm::SLEEP_CONTROL, &[5 << 2]);
        assert!(!exit.is_set(), "SLP_EN clear");
        pm.write(AcpiPm::SLEEP_CONTROL, &[(3 << 2) | (1 << 5)]);
        assert!(!exit.is_set(), "S3 is not poweroff");
        pm.write(AcpiPm::SLEEP_CONTROL, &[(5 << 2) | (1 << 5)]);
        assert_eq!(exit.pending(), Some(ExitRequest::Poweroff));
    }

    #[test]
    fn reset_register_needs_the_reset_value() {
        let (mut pm, exit) = dev();
        pm.write(AcpiPm::RESET, &[2]);
        assert!(!exit.is_set());
        pm.write(AcpiPm::RESET, &[1]);
        assert_eq!(exit.pending(), Some(ExitRequest::Reset));
        let mut b = [0];
        pm.read(AcpiPm::SLEEP_STATUS, &mut b);
        assert_eq!(b[0], 0x80);
    }
}
