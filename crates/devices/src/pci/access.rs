//! The guest's ways into the [`PciSegment`]: configuration mechanism #1 (ports 0xCF8/0xCFC),
//! ECAM (memory-mapped configuration, 4 KiB per function), and the MMIO windows the BARs live in.
//! Each is a [`BusDevice`] for the VMM's PIO or MMIO bus; they only decode, the segment acts.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::BusDevice;
use crate::pci::segment::PciSegment;

pub type SharedSegment = Arc<Mutex<PciSegment>>;

fn lock(segment: &SharedSegment) -> MutexGuard<'_, PciSegment> {
    segment.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bus, device, function and register offset of one configuration access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConfigAddress {
    bus: u8,
    device: u8,
    function: u8,
    offset: usize,
}

/// Configuration mechanism #1: a dword address register at 0xCF8 (bit 31 enables) and a data
/// window at 0xCFC..0xCFF for the addressed dword of the first 256 bytes.
pub struct PciConfigIo {
    segment: SharedSegment,
    address: u32,
}

impl PciConfigIo {
    pub const PORT: u16 = 0xcf8;
    pub const PORT_SPAN: u64 = 8;
    const ENABLE: u32 = 1 << 31;

    pub fn new(segment: SharedSegment) -> Self {
        Self {
            segment,
            address: 0,
        }
    }

    /// The target of a data-window access at `offset` (4..8) of `len` bytes, if enabled and
    /// inside the addressed dword.
    fn target(&self, offset: u64, len: usize) -> Option<ConfigAddress> {
        let byte = offset.checked_sub(4)? as usize;
        if self.address & Self::ENABLE == 0 || byte + len > 4 || len == 0 {
            return None;
        }
        Some(ConfigAddress {
            bus: (self.address >> 16) as u8,
            device: ((self.address >> 11) & 0x1f) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
            offset: (self.address & 0xfc) as usize + byte,
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        match self.target(offset, data.len()) {
            Some(a) => lock(&self.segment).config_read(a.bus, a.device, a.function, a.offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a dword write latches the address register (narrower ones are other I/O).
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return;
        }
        if let Some(a) = self.target(offset, data.len()) {
            lock(&self.segment).config_write(a.bus, a.device, a.function, a.offset, data);
        }
    }
}

/// ECAM: bus << 20 | device << 15 | function << 12 | register, from the window's base. Accesses
/// of 1, 2 or 4 bytes, naturally aligned; anything else reads all-ones and writes nothing.
pub struct PciEcam {
    segment: SharedSegment,
}

impl PciEcam {
    /// Bytes of ECAM per bus.
    pub const BUS_SIZE: u64 = 1 << 20;

    pub fn new(segment: SharedSegment) -> Self {
        Self { segment }
    }

    fn decode(offset: u64, len: usize) -> Option<ConfigAddress> {
        if !matches!(len, 1 | 2 | 4) || offset % len as u64 != 0 || offset >> 20 > 0xff {
            return None;
        }
        Some(ConfigAddress {
            bus: (offset >> 20) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
            offset: (offset & 0xfff) as usize,
        })
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Some(a) => lock(&self.segment).config_read(a.bus, a.device, a.function, a.offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(a) = Self::decode(offset, data.len()) {
            lock(&self.segment).config_write(a.bus, a.device, a.function, a.offset, data);
        }
    }
}

/// One PCI MMIO window (32- or 64-bit) on the MMIO bus; the segment finds the BAR by address.
pub struct PciMmioWindow {
    segment: SharedSegment,
    base: u64,
}

impl PciMmioWindow {
    pub fn new(segment: SharedSegment, base: u64) -> Self {
        Self { segment, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let hit = self
            .base
            .checked_add(offset)
            .is_some_and(|addr| lock(&self.segment).mmio_read(addr, data));
        if !hit {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(addr) = self.base.checked_add(offset) {
            lock(&self.segment).mmio_write(addr, data);
        }
    }
}
