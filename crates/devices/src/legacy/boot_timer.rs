//! A port the guest writes to when it reaches a milestone; the VMM logs the time since it started.

use std::time::Instant;

use crate::bus::BusDevice;

pub struct BootTimer {
    start: Instant,
    seen: u32,
}

impl BootTimer {
    pub const PORT: u16 = 0x440;
    const LOGGED_MILESTONES: u32 = 16;

    pub fn new(start: Instant) -> Self {
        Self { start, seen: 0 }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.seen = self.seen.saturating_add(1);
        // A guest writing in a loop must not flood the host's log.
        if self.seen > Self::LOGGED_MILESTONES {
            return;
        }
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
