//! The `console` check: writes `hyperpool-virtio-console\n` through the first modern
//! virtio-console on bus 0 with `virtio-drivers`' `VirtIOConsole` (the host side decides where
//! it goes: `--console tty|file=PATH`).

use crate::paging;
use crate::pci::{self, Ecam};
use crate::virtio::ProbeHal;
use alloc::format;
use alloc::string::String;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::pci::bus::PciRoot;
use virtio_drivers::transport::pci::{PciTransport, VIRTIO_VENDOR_ID};

/// Modern (virtio 1.x) virtio-console PCI device id (0x1040 + 3).
const CONSOLE_MODERN: u16 = 0x1043;
const MESSAGE: &[u8] = b"hyperpool-virtio-console\n";

/// Checks that every memory BAR is assigned and reachable through the probe's page tables.
fn check_bars(root: &mut PciRoot<Ecam>, f: &pci::Function) -> Result<(), String> {
    let df = f.df;
    for b in pci::bars(root, f)? {
        if b.address() == 0 {
            return Err(format!("{df} bar{} unassigned", b.index));
        }
        if b.kind() != "io" {
            let end = b.address() + b.size();
            let window_ok = b.address() >> 21 == (end - 1) >> 21 && end <= 512 << 30;
            if end > paging::MAPPED_LIMIT && !window_ok {
                return Err(format!(
                    "{df} bar{} at {:#x} is beyond the probe's identity map",
                    b.index,
                    b.address()
                ));
            }
        }
    }
    Ok(())
}

/// The `console` check.
pub fn check(rsdp: u64) -> Result<String, String> {
    let ecam = pci::find_ecam(rsdp)?;
    let mut root = PciRoot::new(ecam);
    let functions = pci::scan_bus(&ecam, 0);
    let func = functions
        .iter()
        .find(|f| f.vendor == VIRTIO_VENDOR_ID && f.device == CONSOLE_MODERN)
        .ok_or_else(|| {
            format!(
                "no virtio 1.x console ({VIRTIO_VENDOR_ID:04x}:{CONSOLE_MODERN:04x}) on bus 0 \
                 ({} functions)",
                functions.len()
            )
        })?;
    let df = func.df;
    check_bars(&mut root, func)?;
    pci::enable(&mut root, df);
    let transport = PciTransport::new::<ProbeHal, _>(&mut root, df)
        .map_err(|e| format!("{df} transport: {e}"))?;
    // Dropping the console resets the device before its queues' memory is freed.
    let mut console =
        VirtIOConsole::<ProbeHal, _>::new(transport).map_err(|e| format!("{df} device: {e}"))?;
    console
        .send_bytes(MESSAGE)
        .map_err(|e| format!("{df} send: {e}"))?;
    Ok(format!("{df} bytes={}", MESSAGE.len()))
}
