//! PCI segment 0, bus 0: the host bridge at slot 0 and up to 31 devices (function 0 each), their
//! BAR placement, and the dispatch of configuration and BAR accesses.
//!
//! BARs are not mapped one by one on the VMM's MMIO bus: the whole PCI MMIO windows are, and the
//! segment finds the BAR by the address the guest currently programs ([`PciSegment::mmio_read`]).
//! So a guest that moves a BAR (Linux may reassign) needs no bus remapping; only the device's
//! ioeventfds move, which the segment does when it sees the decoded address change.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::pci::config::{
    BarKind, COMMAND_INTX_DISABLE, COMMAND_MEMORY, ConfigError, NUM_BARS, STATUS, STATUS_INTERRUPT,
};
use crate::pci::device::{IoEventRegistry, PciDevice};
use crate::pci::host_bridge::HostBridge;
use crate::pci::intx::IntxRouting;

/// Device numbers on bus 0 (slot 0 is the host bridge).
pub const NUM_SLOTS: usize = 32;
/// First GSI of the four IOAPIC pins shared by INTx (the PC convention: IOAPIC pins 16..19).
pub const INTX_GSI_BASE: u32 = 16;

/// The IOAPIC GSI that INTx `pin` (0 = INTA# .. 3 = INTD#) of `slot` raises: the PCI-to-PCI
/// bridge swizzle, applied on the root bus so neighbouring slots spread over the four lines.
/// The DSDT's `_PRT` states the same map.
pub const fn intx_gsi(slot: u8, pin: u8) -> u32 {
    INTX_GSI_BASE + ((slot as u32 + pin as u32) % 4)
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("all {NUM_SLOTS} PCI slots are taken")]
    NoFreeSlot,
    #[error("no room for a {size:#x}-byte BAR in the {window} PCI window")]
    NoBarSpace { size: u64, window: &'static str },
    #[error("I/O BARs are not supported (BAR {0})")]
    IoBar(u8),
    #[error("PCI window {0:#x}+{1:#x} is empty or wraps")]
    BadWindow(u64, u64),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("connecting the INTx pin to GSI {gsi}: {source}")]
    Intx {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A guest-physical range `[start, start + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub size: u64,
}

impl Window {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

struct Slot {
    device: SharedPciDevice,
    /// Where each BAR decodes now: `None` while memory decoding is off or for unimplemented BARs.
    decoded: [Option<u64>; NUM_BARS],
    sizes: [u64; NUM_BARS],
    /// What the allocators handed out for each BAR, given back when the device is removed.
    ranges: [Option<(RangeInclusive, bool)>; NUM_BARS],
    /// The GSI its INTx pin is connected to, if it has one.
    intx_gsi: Option<u32>,
}

/// Where an MMIO address landed.
struct BarHit {
    device: SharedPciDevice,
    bar: u8,
    offset: u64,
}

pub struct PciSegment {
    slots: Vec<Option<Slot>>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    ioevents: Arc<dyn IoEventRegistry>,
    intx: Arc<dyn IntxRouting>,
}

fn lock(device: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // Device state is plain data: a panic on another thread leaves it usable.
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciSegment {
    /// Bus 0 with the host bridge; BARs go in `mmio32` (below 4 GiB) and `mmio64`; notification
    /// addresses are registered with `ioevents`, INTx pins connected through `intx`.
    pub fn new(
        mmio32: Window,
        mmio64: Window,
        ioevents: Arc<dyn IoEventRegistry>,
        intx: Arc<dyn IntxRouting>,
    ) -> Result<Self, PciError> {
        let allocator = |w: Window| {
            AddressAllocator::new(w.start, w.size).map_err(|_| PciError::BadWindow(w.start, w.size))
        };
        let mut segment = Self {
            slots: (0..NUM_SLOTS).map(|_| None).collect(),
            mmio32: allocator(mmio32)?,
            mmio64: allocator(mmio64)?,
            ioevents,
            intx,
        };
        segment.slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            decoded: [None; NUM_BARS],
            sizes: [0; NUM_BARS],
            ranges: Default::default(),
            intx_gsi: None,
        });
        Ok(segment)
    }

    /// The slot [`PciSegment::add_device`] would use, if one is free.
    pub fn free_slot(&self) -> Option<u8> {
        self.slots.iter().position(Option::is_none).map(|s| s as u8)
    }

    /// Plugs `device` into the first free slot, places its BARs, and routes its INTx pin (if its
    /// config space declares one): the Interrupt Line register gets the GSI the `_PRT` states,
    /// and the device's [`IntxPin`](crate::pci::IntxPin) is connected to it. Returns the slot.
    /// On failure nothing stays allocated.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let slot = self.free_slot().ok_or(PciError::NoFreeSlot)?;
        let mut placed = Slot {
            device: device.clone(),
            decoded: [None; NUM_BARS],
            sizes: [0; NUM_BARS],
            ranges: Default::default(),
            intx_gsi: None,
        };
        if let Err(e) = self.place(slot, &mut placed) {
            self.release_bars(&mut placed);
            return Err(e);
        }
        self.slots[usize::from(slot)] = Some(placed);
        Ok(slot)
    }

    fn place(&mut self, slot: u8, placed: &mut Slot) -> Result<(), PciError> {
        let device = placed.device.clone();
        let mut dev = lock(&device);
        for req in dev.bar_requests() {
            let (allocator, window, high) = match req.kind {
                BarKind::Io => return Err(PciError::IoBar(req.index)),
                BarKind::Memory32 { .. } => (&mut self.mmio32, "32-bit", false),
                BarKind::Memory64 { .. } => (&mut self.mmio64, "64-bit", true),
            };
            let no_space = PciError::NoBarSpace {
                size: req.size,
                window,
            };
            let index = usize::from(req.index);
            if !req.size.is_power_of_two() || index >= NUM_BARS || placed.ranges[index].is_some() {
                return Err(ConfigError::BadBarSize(req.size).into());
            }
            let range = allocator
                .allocate(req.size, req.size, AllocPolicy::FirstMatch)
                .map_err(|_| no_space)?;
            let start = range.start();
            placed.ranges[index] = Some((range, high));
            dev.config().add_bar(index, req.kind, req.size, start)?;
            placed.sizes[index] = req.size;
        }
        let pin = dev.config().interrupt_pin();
        if (1..=4).contains(&pin) {
            let gsi = intx_gsi(slot, pin - 1);
            dev.config().set_interrupt(pin, gsi as u8);
            if let Some(line) = dev.intx() {
                self.intx
                    .connect(gsi, line.clone())
                    .map_err(|source| PciError::Intx { gsi, source })?;
                placed.intx_gsi = Some(gsi);
            }
        }
        Ok(())
    }

    fn release_bars(&mut self, slot: &mut Slot) {
        for (range, high) in slot.ranges.iter_mut().filter_map(Option::take) {
            let allocator = if high {
                &mut self.mmio64
            } else {
                &mut self.mmio32
            };
            if let Err(e) = allocator.free(&range) {
                tracing::warn!("PCI: freeing BAR range {range:?}: {e}");
            }
        }
    }

    /// Unplugs the device in `slot` (1..31): the guest no longer reaches it, its ioeventfds and
    /// INTx pin are disconnected and its BAR space is free for the next device. Returns the
    /// device, or `None` for an empty slot or the host bridge.
    pub fn remove_device(&mut self, slot: u8) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        let mut removed = self.slots.get_mut(usize::from(slot))?.take()?;
        {
            let dev = lock(&removed.device);
            for event in dev.ioeventfds() {
                let base = removed
                    .decoded
                    .get(usize::from(event.bar))
                    .copied()
                    .flatten();
                if let Some(addr) = base.and_then(|b| b.checked_add(event.offset)) {
                    if let Err(e) = self.ioevents.unregister(addr, event.fd) {
                        tracing::warn!("PCI slot {slot}: unregistering an ioeventfd: {e}");
                    }
                }
            }
            if let (Some(gsi), Some(pin)) = (removed.intx_gsi, dev.intx()) {
                if let Err(e) = self.intx.disconnect(gsi, pin) {
                    tracing::warn!("PCI slot {slot}: disconnecting INTx from GSI {gsi}: {e}");
                }
            }
        }
        self.release_bars(&mut removed);
        Some(removed.device)
    }

    fn slot(&self, bus: u8, device: u8, function: u8) -> Option<&Slot> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(device))?.as_ref()
    }

    /// Guest read of configuration space; absent functions read all-ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        let Some(slot) = self.slot(bus, device, function) else {
            data.fill(0xff);
            return;
        };
        let mut dev = lock(&slot.device);
        dev.config().read(offset, data);
        // Interrupt Status (status bit 3): the INTx condition, whether or not it is masked.
        if let Some(pending) = dev.intx().map(|p| p.pending()) {
            if let Some(b) = STATUS
                .checked_sub(offset)
                .and_then(|i| data.get_mut(i))
                .filter(|_| pending)
            {
                *b |= STATUS_INTERRUPT as u8;
            }
        }
        dev.config_read(offset, data);
    }

    /// Guest write of configuration space; writes to absent functions are dropped.
    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        if self.slot(bus, device, function).is_none() {
            return;
        }
        let Some(slot) = self.slots[usize::from(device)].as_mut() else {
            return;
        };
        let device = slot.device.clone();
        let mut dev = lock(&device);
        dev.config().write(offset, data);
        let mut msix_enabled = false;
        if let Some(msix) = dev.msix().cloned() {
            let control_at = msix.lock().control_offset();
            if offset < control_at + 2 && control_at < offset + data.len() {
                let control = dev.config().read_u16(control_at);
                msix.lock().set_control(control);
            }
            msix_enabled = msix.lock().enabled();
        }
        // A function drives INTx only with Interrupt Disable clear and MSI-X off (PCI 3.0
        // §6.8.2.3). Re-evaluated on every write: both live in config space.
        let intx_disabled = dev.config().command() & COMMAND_INTX_DISABLE != 0;
        if let Some(pin) = dev.intx() {
            pin.set_masked(intx_disabled || msix_enabled);
        }
        dev.config_written(offset, data);
        update_decoding(slot, &mut *dev, self.ioevents.as_ref());
    }

    /// The device, BAR and offset that decode `[addr, addr + len)`, if one does entirely.
    fn find_bar(&self, addr: u64, len: usize) -> Option<BarHit> {
        self.slots.iter().flatten().find_map(|slot| {
            slot.decoded.iter().enumerate().find_map(|(bar, base)| {
                let offset = addr.checked_sub((*base)?)?;
                let end = offset.checked_add(len as u64)?;
                (end <= slot.sizes[bar]).then(|| BarHit {
                    device: slot.device.clone(),
                    bar: bar as u8,
                    offset,
                })
            })
        })
    }

    /// Guest MMIO read in the PCI windows; returns false when no BAR decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some(hit) = self.find_bar(addr, data.len()) else {
            return false;
        };
        let mut dev = lock(&hit.device);
        if let Some(msix) = dev.msix() {
            let msix = msix.lock();
            let layout = msix.layout();
            if let Some(off) = within(hit.bar, hit.offset, layout.table_bar, layout.table_offset)
                .filter(|o| *o < layout.table_size())
            {
                msix.read_table(off, data);
                return true;
            }
            if let Some(off) = within(hit.bar, hit.offset, layout.pba_bar, layout.pba_offset)
                .filter(|o| *o < layout.pba_size())
            {
                msix.read_pba(off, data);
                return true;
            }
        }
        dev.read_bar(hit.bar, hit.offset, data);
        true
    }

    /// Guest MMIO write in the PCI windows; returns false when no BAR decodes it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some(hit) = self.find_bar(addr, data.len()) else {
            return false;
        };
        let mut dev = lock(&hit.device);
        if let Some(msix) = dev.msix() {
            let mut msix = msix.lock();
            let layout = msix.layout();
            if let Some(off) = within(hit.bar, hit.offset, layout.table_bar, layout.table_offset)
                .filter(|o| *o < layout.table_size())
            {
                msix.write_table(off, data);
                return true;
            }
            if within(hit.bar, hit.offset, layout.pba_bar, layout.pba_offset)
                .is_some_and(|o| o < layout.pba_size())
            {
                return true; // the PBA is read-only
            }
        }
        dev.write_bar(hit.bar, hit.offset, data);
        true
    }
}

/// `offset` relative to a structure at `base` in BAR `bar`, if the access is in that BAR past it.
fn within(bar: u8, offset: u64, want_bar: u8, base: u32) -> Option<u64> {
    (bar == want_bar).then(|| offset.checked_sub(u64::from(base)))?
}

/// Re-reads where the device's BARs decode and moves its ioeventfds with them.
fn update_decoding(slot: &mut Slot, dev: &mut dyn PciDevice, ioevents: &dyn IoEventRegistry) {
    let memory_on = dev.config().command() & COMMAND_MEMORY != 0;
    let mut now = [None; NUM_BARS];
    for (bar, decoded) in now.iter_mut().enumerate() {
        *decoded = dev
            .config()
            .bar_address(bar)
            .filter(|_| memory_on && slot.sizes[bar] > 0);
    }
    if now == slot.decoded {
        return;
    }
    for event in dev.ioeventfds() {
        let bar = usize::from(event.bar);
        let (Some(old), Some(new)) = (slot.decoded.get(bar), now.get(bar)) else {
            continue;
        };
        if old == new {
            continue;
        }
        // A guest can program a BAR anywhere, even where base + offset wraps: skip those.
        if let Some(addr) = old.and_then(|b| b.checked_add(event.offset)) {
            if let Err(e) = ioevents.unregister(addr, event.fd) {
                tracing::warn!("PCI BAR {bar}: unregistering an ioeventfd: {e}");
            }
        }
        if let Some(addr) = new.and_then(|b| b.checked_add(event.offset)) {
            if let Err(e) = ioevents.register(addr, event.fd) {
                tracing::warn!("PCI BAR {bar}: registering an ioeventfd: {e}");
            }
        }
    }
    slot.decoded = now;
}
