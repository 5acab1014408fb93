//! The `console` check: writes `hyperpool-virtio-console\n` through the first modern
//! virtio-console on bus 0 with `virtio-drivers`' `VirtIOConsole` (the host side decides where
//! it goes: `--console tty|file=PATH`).

use crate::virtio::{self, ProbeHal};
use alloc::format;
use alloc::string::String;
use virtio_drivers::device::console::VirtIOConsole;

/// Modern (virtio 1.x) virtio-console PCI device id (0x1040 + 3).
const CONSOLE_MODERN: u16 = 0x1043;
const MESSAGE: &[u8] = b"hyperpool-virtio-console\n";

/// The `console` check.
pub fn check(rsdp: u64) -> Result<String, String> {
    let (df, transport) = virtio::open_first(rsdp, CONSOLE_MODERN, "console")?;
    // Dropping the console resets the device before its queues' memory is freed.
    let mut console =
        VirtIOConsole::<ProbeHal, _>::new(transport).map_err(|e| format!("{df} device: {e}"))?;
    console
        .send_bytes(MESSAGE)
        .map_err(|e| format!("{df} send: {e}"))?;
    Ok(format!("{df} bytes={}", MESSAGE.len()))
}
