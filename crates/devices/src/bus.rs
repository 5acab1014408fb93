//! An address-range bus that dispatches guest accesses (port I/O or MMIO) to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a range of a [`Bus`]. `offset` is relative to the range's base.
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other: u64,
        other_len: u64,
    },
    #[error("bus range at {0:#x} is empty or wraps around the address space")]
    BadRange(u64),
}

/// A device as the bus holds it: shared with whoever else drives it (e.g. a console thread).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    len: u64,
    device: SharedDevice,
}

/// Maps non-overlapping address ranges to devices.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(base))?;
        let overlapping = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(other, r)| **other + r.len > base);
        if let Some((other, r)) = overlapping {
            return Err(BusError::Overlap {
                base,
                len,
                other: *other,
                other_len: r.len,
            });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range: a guest straddling two devices gets nothing.
        (offset.checked_add(size as u64)? <= range.len).then_some((offset, &range.device))
    }

    /// Dispatches a read; returns false when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panic on another vCPU thread is still served: its state is
/// plain data and the guest, not the VMM, lives with whatever that half-done access left behind.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn dev(v: u8) -> SharedDevice {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn dispatches_by_offset() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev(10)).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.write(0x3f8, &[40]));
        assert!(bus.read(0x3f8, &mut b));
        assert_eq!(b[0], 40);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_miss() {
        let mut bus = Bus::new();
        bus.insert(0x60, 1, dev(0)).unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.read(0x61, &mut b[..1]));
        assert!(!bus.read(0x5f, &mut b[..1]));
        assert!(!bus.read(0x60, &mut b), "2-byte read past a 1-byte device");
        assert!(!bus.write(u64::MAX, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev(0)).unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, dev(0)),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(0xf8, 0x10, dev(0)),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x110, 1, dev(0)).unwrap();
        bus.insert(0xf0, 0x10, dev(0)).unwrap();
        assert_eq!(bus.insert(5, 0, dev(0)), Err(BusError::BadRange(5)));
        assert_eq!(
            bus.insert(u64::MAX, 2, dev(0)),
            Err(BusError::BadRange(u64::MAX))
        );
    }
}
