//! A split virtqueue that ring-3 code drives by itself, for the I/O benchmarks.
//!
//! Ring 0 is emulated on PVM hosts (~1000× slower than native), so a benchmark whose driver
//! runs in ring 0 measures the emulator, not the VMM. Here ring 0 only brings the device up
//! (status, features and queue addresses through `virtio-drivers`' `PciTransport`) and then
//! hands ring 3 a [`RawQueue`]: the descriptor table and rings in identity-mapped RAM and the
//! queue's notify address in the device's BAR (every identity mapping has the USER bit). Ring 3
//! fills the avail ring, writes the notify register itself (an MMIO write that KVM turns into
//! an ioeventfd signal) and polls the used ring. No interrupts: MSI-X stays disabled and the
//! avail ring says VIRTQ_AVAIL_F_NO_INTERRUPT.
//!
//! Notifications follow the split-ring rules without VIRTIO_F_EVENT_IDX: after publishing new
//! avail entries the driver kicks unless the device has set VIRTQ_USED_F_NO_NOTIFY.

use crate::paging;
use crate::pci::Ecam;
use crate::virtio::{self, BarNote, Found};
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{Ordering, fence};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PCI_CAP_ID_VNDR};
use virtio_drivers::transport::{DeviceStatus, Transport};

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// `virtio_pci_common_cfg.queue_select` and `.queue_notify_off`.
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// A device must finish a reset within this.
const RESET_TIMEOUT_US: u64 = 2_000_000;

/// Where a device's common configuration and notify registers are, from its vendor
/// capabilities (virtio 1.x, 4.1.4). `PciTransport` keeps its copy private.
struct Registers {
    common: u64,
    notify_base: u64,
    notify_multiplier: u32,
}

/// Base address of memory BAR `bar` (no sizing, so decoding stays on).
fn bar_address(ecam: &Ecam, df: DeviceFunction, bar: u8) -> Option<u64> {
    if bar > 5 {
        return None;
    }
    let lo = ecam.read_word(df, 0x10 + 4 * bar);
    if lo & 1 != 0 {
        return None; // I/O BAR
    }
    let mut addr = u64::from(lo & !0xf);
    if (lo >> 1) & 3 == 2 {
        if bar == 5 {
            return None;
        }
        addr |= u64::from(ecam.read_word(df, 0x14 + 4 * bar)) << 32;
    }
    (addr != 0).then_some(addr)
}

fn registers(ecam: &Ecam, found: &Found, df: DeviceFunction) -> Result<Registers, String> {
    let mut common = None;
    let mut notify = None;
    for cap in found.capabilities(df) {
        if cap.id != PCI_CAP_ID_VNDR {
            continue;
        }
        let cfg_type = (cap.private_header >> 8) as u8;
        let bar = ecam.read_word(df, cap.offset + 4) as u8;
        let offset = u64::from(ecam.read_word(df, cap.offset + 8));
        let addr = || {
            bar_address(ecam, df, bar)
                .map(|base| base + offset)
                .ok_or_else(|| format!("{df} capability in bar{bar}, which is not a memory BAR"))
        };
        match cfg_type {
            VIRTIO_PCI_CAP_COMMON_CFG if common.is_none() => common = Some(addr()?),
            VIRTIO_PCI_CAP_NOTIFY_CFG if notify.is_none() => {
                let multiplier = ecam.read_word(df, cap.offset + 16);
                notify = Some((addr()?, multiplier));
            }
            _ => {}
        }
    }
    let common = common.ok_or_else(|| format!("{df} has no common configuration capability"))?;
    let (notify_base, notify_multiplier) =
        notify.ok_or_else(|| format!("{df} has no notify capability"))?;
    Ok(Registers {
        common,
        notify_base,
        notify_multiplier,
    })
}

/// A device brought up for ring-3 queues: reset, features negotiated, queues still to add.
pub struct Device {
    pub df: DeviceFunction,
    pub transport: PciTransport,
    pub features: u64,
    regs: Registers,
}

/// Resets `found.functions[i]` and negotiates `VERSION_1` plus whatever of `wanted` the device
/// offers. Queues are added with [`Device::add_queue`], then [`Device::start`].
pub fn bring_up(found: &mut Found, i: usize, wanted: u64) -> Result<Device, String> {
    let df = found.functions[i].df;
    let ecam = found.ecam();
    let mut transport = found.open(i, BarNote::Index)?;
    match registers(&ecam, found, df)
        .and_then(|regs| negotiate(&mut transport, df, wanted).map(|f| (regs, f)))
    {
        Ok((regs, features)) => Ok(Device {
            df,
            transport,
            features,
            regs,
        }),
        Err(e) => {
            // A bounded reset: the transport's own drop would wait forever for a stuck device.
            let _ = virtio::reset(transport, RESET_TIMEOUT_US);
            Err(e)
        }
    }
}

/// Reset, ACKNOWLEDGE | DRIVER, features (`VERSION_1` required), FEATURES_OK.
fn negotiate(transport: &mut PciTransport, df: DeviceFunction, wanted: u64) -> Result<u64, String> {
    transport.set_status(DeviceStatus::empty());
    transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = transport.read_device_features();
    if offered & F_VERSION_1 == 0 {
        return Err(format!("{df} does not offer VIRTIO_F_VERSION_1"));
    }
    let features = offered & (wanted | F_VERSION_1);
    transport.write_driver_features(features);
    transport
        .set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
        return Err(format!("{df} did not accept features {features:#x}"));
    }
    Ok(features)
}

impl Device {
    /// Lays out queue `index` with `size` entries (at most the device's maximum) at `mem`
    /// (identity-mapped RAM of [`RawQueue::bytes`]`(size)` bytes), and tells the device.
    pub fn add_queue(&mut self, index: u16, size: u16, mem: u64) -> Result<RawQueue, String> {
        let df = self.df;
        let max = self.transport.max_queue_size(index);
        if max == 0 {
            return Err(format!("{df} has no queue {index}"));
        }
        if !size.is_power_of_two() || u32::from(size) > max {
            return Err(format!(
                "{df} queue {index}: size {size} (device maximum {max})"
            ));
        }
        // SAFETY: the common configuration registers are MMIO in an assigned BAR the caller's
        // `Found::open` checked to be identity mapped; selecting a queue and reading its
        // notify offset has no other effect.
        let notify_off = unsafe {
            ((self.regs.common + COMMON_QUEUE_SELECT) as *mut u16).write_volatile(index);
            ((self.regs.common + COMMON_QUEUE_NOTIFY_OFF) as *const u16).read_volatile()
        };
        let notify =
            self.regs.notify_base + u64::from(notify_off) * u64::from(self.regs.notify_multiplier);
        paging::ensure_mapped(notify).map_err(|e| format!("{df} notify at {notify:#x}: {e}"))?;
        let q = RawQueue::new(mem, size, index, notify);
        self.transport
            .queue_set(index, u32::from(size), q.desc, q.avail, q.used);
        Ok(q)
    }

    /// DRIVER_OK: the device may now use the queues.
    pub fn start(&mut self) {
        self.transport.set_status(
            DeviceStatus::ACKNOWLEDGE
                | DeviceStatus::DRIVER
                | DeviceStatus::FEATURES_OK
                | DeviceStatus::DRIVER_OK,
        );
    }

    /// The status the device shows (NEEDS_RESET after a broken queue).
    pub fn status(&self) -> DeviceStatus {
        self.transport.get_status()
    }

    /// Resets the device (bounded wait), so it stops touching the queues' memory.
    pub fn reset(self) -> Result<(), String> {
        let df = self.df;
        virtio::reset(self.transport, RESET_TIMEOUT_US).map_err(|e| format!("{df} {e}"))
    }
}

/// One split virtqueue, driven from ring 3 by the benchmark loops. Plain addresses (all
/// identity mapped): the struct is handed to ring 3 by pointer.
#[repr(C)]
pub struct RawQueue {
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    pub size: u16,
    index: u16,
    /// Next free avail slot (driver's copy of avail.idx, published by [`Self::publish`]).
    next_avail: u16,
    /// Next used entry to look at.
    next_used: u16,
    /// Entries pushed but not yet published.
    unpublished: u16,
    /// Kicks written (for the detail lines).
    pub kicks: u64,
}

impl RawQueue {
    /// Bytes of memory a queue of `size` entries needs (descriptors, avail, used).
    pub const fn bytes(size: u16) -> u64 {
        let size = size as u64;
        Self::used_offset(size) + 6 + 8 * size
    }

    const fn used_offset(size: u64) -> u64 {
        (16 * size + 6 + 2 * size).next_multiple_of(4)
    }

    /// Zeroes the rings at `mem` and sets NO_INTERRUPT.
    fn new(mem: u64, size: u16, index: u16, notify: u64) -> Self {
        let n = u64::from(size);
        // SAFETY: the caller owns `bytes(size)` bytes of identity-mapped RAM at `mem`.
        unsafe {
            core::ptr::write_bytes(mem as *mut u8, 0, Self::bytes(size) as usize);
            ((mem + 16 * n) as *mut u16).write_volatile(AVAIL_F_NO_INTERRUPT);
        }
        Self {
            desc: mem,
            avail: mem + 16 * n,
            used: mem + Self::used_offset(n),
            notify,
            size,
            index,
            next_avail: 0,
            next_used: 0,
            unpublished: 0,
            kicks: 0,
        }
    }

    /// Sets descriptor `i` (`next` chains it to the following one).
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: Option<u16>) {
        let i = u64::from(i % self.size);
        let flags = flags | if next.is_some() { DESC_F_NEXT } else { 0 };
        let p = self.desc + 16 * i;
        // SAFETY: descriptor i lies in the table this queue owns.
        unsafe {
            (p as *mut u64).write_volatile(addr);
            ((p + 8) as *mut u32).write_volatile(len);
            ((p + 12) as *mut u16).write_volatile(flags);
            ((p + 14) as *mut u16).write_volatile(next.unwrap_or(0));
        }
    }

    /// Makes the chain at `head` available (visible to the device after [`Self::publish`]).
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        // SAFETY: the avail ring entry lies in the ring this queue owns.
        unsafe { ((self.avail + 4 + 2 * slot) as *mut u16).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        self.unpublished += 1;
    }

    /// Publishes pushed entries and kicks the device unless it said it is polling.
    pub fn publish(&mut self) {
        if self.unpublished == 0 {
            return;
        }
        self.unpublished = 0;
        fence(Ordering::Release);
        // SAFETY: avail.idx of the ring this queue owns.
        unsafe { ((self.avail + 2) as *mut u16).write_volatile(self.next_avail) };
        // The flag read must not pass the index write (store-load order needs a full fence).
        fence(Ordering::SeqCst);
        // SAFETY: used.flags of the ring this queue owns.
        let flags = unsafe { (self.used as *const u16).read_volatile() };
        if flags & USED_F_NO_NOTIFY == 0 {
            // SAFETY: the queue's notify register (MMIO in the device's BAR, mapped).
            unsafe { (self.notify as *mut u16).write_volatile(self.index) };
            self.kicks += 1;
        }
    }

    /// The next used element `(id, len)`, if the device has returned one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        // SAFETY: used.idx of the ring this queue owns.
        let idx = unsafe { ((self.used + 2) as *const u16).read_volatile() };
        if idx == self.next_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_used % self.size);
        let e = self.used + 4 + 8 * slot;
        // SAFETY: a used element of the ring this queue owns.
        let (id, len) = unsafe {
            (
                (e as *const u32).read_volatile(),
                ((e + 4) as *const u32).read_volatile(),
            )
        };
        self.next_used = self.next_used.wrapping_add(1);
        Some((id, len))
    }

    /// Chains made available and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.next_used)
    }
}
