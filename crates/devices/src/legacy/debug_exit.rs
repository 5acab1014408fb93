//! QEMU's isa-debug-exit convention: a write of `v` ends the VMM with exit code `(v << 1) | 1`.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitRequest, ExitSignal};

pub struct DebugExit {
    exit: Arc<ExitSignal>,
}

impl DebugExit {
    /// The conventional port.
    pub const PORT: u16 = 0xf4;
    /// Accepts 1-, 2- and 4-byte writes like QEMU's `iosize=4`.
    pub const PORT_SPAN: u64 = 4;

    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }

    /// The process exit code for a written value (only the low byte survives as an exit status).
    pub fn exit_code(value: u8) -> i32 {
        ((i32::from(value) << 1) | 1) & 0xff
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&v)) = (offset, data.first()) {
            self.exit.request(ExitRequest::DebugExit(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_qemu_code() {
        let exit = Arc::new(ExitSignal::new());
        let mut dev = DebugExit::new(exit.clone());
        dev.write(0, &[0x21, 0, 0, 0]);
        assert_eq!(exit.pending(), Some(ExitRequest::DebugExit(0x21)));
        assert_eq!(DebugExit::exit_code(0x21), 0x43);
        assert_eq!(DebugExit::exit_code(0), 1);
        assert_eq!(DebugExit::exit_code(0xff), 0xff);
    }
}
