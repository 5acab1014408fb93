//! A port the guest writes to when it reaches a milestone; the VMM logs the time since it started.

use std::time::Instant;

use crate::bus::BusDevice;

pub struct BootTimer {
    start: Instant,
    seen: u32,
}

impl BootTimer {
    pub const PORT: u16 = 0x440;

    pub fn new(start: Instant) -> Self {
        Self { start, seen: 0 }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.seen += 1;
        let value = data.first().copied().unwrap_or(0);
        let elapsed = self.start.elapsed();
        tracing::info!(
            target: "boot_timer",
            "guest boot milestone {} (value {value:#x}) at {:.3} ms since VMM start",
            self.seen,
            elapsed.as_secs_f64() * 1e3
        );
    }
}
