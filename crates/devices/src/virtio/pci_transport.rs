//! The modern (virtio 1.x) virtio-pci transport: the registers of one memory BAR and the
//! vendor-specific PCI capabilities that point the driver at them (virtio 1.2 §4.1).
//!
//! BAR layout (`BAR_SIZE` bytes, one page per structure):
//!
//! | offset   | structure            | capability length              |
//! |----------|----------------------|--------------------------------|
//! | `0x0000` | common configuration | `0x38`                         |
//! | `0x1000` | ISR status           | 1                              |
//! | `0x2000` | device configuration | the device's `config_size()`   |
//! | `0x3000` | notifications        | 4 × queues (multiplier 4)      |
//!
//! The PCI side owns config space, the BAR's placement and MSI-X; it copies [`VirtioPciCap`]s
//! into its capability list, routes BAR accesses to [`VirtioPciTransport::read`] /
//! [`VirtioPciTransport::write`], registers [`VirtioPciTransport::notify_events`] as KVM
//! ioeventfds, and delivers interrupts through the [`VirtioInterrupt`] it passed in.
//!
//! Every value here comes from the guest: nothing panics, and a configuration the device cannot
//! use sets `DEVICE_NEEDS_RESET`.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActivatedQueue, VirtioDevice};
use super::interrupt::{DeviceInterrupt, IsrStatus, VirtioInterrupt};
use super::queue_setup::{RingAddrs, configured_queue};
use super::{GuestMemoryHandle, MAX_QUEUE_SIZE, NO_VECTOR, features, status};

pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const ISR_LEN: u64 = 1;
pub const DEVICE_OFFSET: u64 = 0x2000;
pub const DEVICE_MAX_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Size of the memory BAR the transport occupies (a power of two, as BARs must be).
pub const BAR_SIZE: u64 = 0x4000;
/// Queues that fit the notification page.
pub const MAX_QUEUES: usize = 0x1000 / NOTIFY_OFF_MULTIPLIER as usize;

/// `cfg_type` values of `struct virtio_pci_cap`.
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// PCI capability id of vendor-specific capabilities.
pub const PCI_CAP_ID_VNDR: u8 = 0x09;

// Common configuration register offsets (struct virtio_pci_common_cfg).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// One `struct virtio_pci_cap` (or `virtio_pci_notify_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioPciCap {
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
    /// Only for [`cfg_type::NOTIFY`].
    pub notify_off_multiplier: Option<u32>,
}

impl VirtioPciCap {
    /// The capability as it sits in config space: `cap_vndr` (0x09), `cap_next` (0: the PCI side
    /// links it), `cap_len`, `cfg_type`, `bar`, `id` (0), padding, `offset`, `length`
    /// [, `notify_off_multiplier`].
    pub fn bytes(&self) -> Vec<u8> {
        let len = if self.notify_off_multiplier.is_some() {
            20
        } else {
            16
        };
        let mut b = vec![PCI_CAP_ID_VNDR, 0, len, self.cfg_type, self.bar, 0, 0, 0];
        b.extend_from_slice(&self.offset.to_le_bytes());
        b.extend_from_slice(&self.length.to_le_bytes());
        if let Some(m) = self.notify_off_multiplier {
            b.extend_from_slice(&m.to_le_bytes());
        }
        b
    }
}

/// What the device looks like on the PCI bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// `class << 16 | subclass << 8 | prog_if`.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

impl PciIds {
    /// The modern ids for virtio device type `device_type`.
    pub fn for_device_type(device_type: u32) -> Self {
        use virtio_bindings::virtio_ids as id;
        let class_code = match device_type {
            id::VIRTIO_ID_NET => 0x02_00_00,     // network, ethernet
            id::VIRTIO_ID_BLOCK => 0x01_80_00,   // mass storage, other
            id::VIRTIO_ID_CONSOLE => 0x07_80_00, // communication, other
            _ => 0xff_00_00,                     // unclassified (rng, vsock, ...)
        };
        Self {
            vendor_id: 0x1af4,
            device_id: 0x1040u16.wrapping_add(device_type as u16),
            revision_id: 1,
            class_code,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device has {0} queues; the transport supports 1 to {MAX_QUEUES}")]
    QueueCount(usize),
    #[error("queue {index}: size {size} is not a power of two in 1..={MAX_QUEUE_SIZE}")]
    QueueSize { index: usize, size: u16 },
    #[error("device config space of {0} bytes exceeds {DEVICE_MAX_LEN}")]
    ConfigSize(usize),
    #[error("device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// The driver's view of one queue before activation.
struct QueueSlot {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    event: EventFd,
}

impl QueueSlot {
    fn reset(&mut self) {
        self.size = self.max_size;
        self.enabled = false;
        self.desc = 0;
        self.driver = 0;
        self.device = 0;
    }

    /// The queue as configured, if the configuration is usable with guest memory `mem`.
    fn build(&self, mem: &GuestMemoryHandle, event_idx: bool) -> Result<Queue, String> {
        let addrs = RingAddrs {
            desc: self.desc,
            avail: self.driver,
            used: self.device,
        };
        configured_queue(self.max_size, self.size, addrs, event_idx, &mem.memory())
    }
}

/// A virtio device behind the modern virtio-pci register layout.
pub struct VirtioPciTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryHandle,
    interrupt: DeviceInterrupt,
    bar: u8,
    msix_vectors: u16,
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueSlot>,
    active: bool,
}

impl VirtioPciTransport {
    /// Wraps `device`, whose registers the PCI side maps at BAR index `bar`, delivering
    /// interrupts through `sink`; `msix_vectors` is the size of the MSI-X table the PCI side
    /// gives the function (a vector the driver picks at or above it reads back as NO_VECTOR;
    /// `queues + 1` lets every queue and config changes have their own).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryHandle,
        sink: Arc<dyn VirtioInterrupt>,
        bar: u8,
        msix_vectors: u16,
    ) -> Result<Self, TransportError> {
        Self::with_isr(device, mem, sink, bar, msix_vectors, IsrStatus::default())
    }

    /// [`Self::new`] with the ISR register shared with the caller (the PCI side's INTx pin
    /// follows it).
    pub fn with_isr(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryHandle,
        sink: Arc<dyn VirtioInterrupt>,
        bar: u8,
        msix_vectors: u16,
        isr: IsrStatus,
    ) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(TransportError::QueueCount(sizes.len()));
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                    return Err(TransportError::QueueSize { index, size });
                }
                Ok(QueueSlot {
                    max_size: size,
                    size,
                    enabled: false,
                    desc: 0,
                    driver: 0,
                    device: 0,
                    event: EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if device.config_size() as u64 > DEVICE_MAX_LEN {
            return Err(TransportError::ConfigSize(device.config_size()));
        }
        let offered = device.features();
        if offered & features::VERSION_1 == 0 {
            return Err(TransportError::NotModern);
        }
        let name = format!("device type {}", device.device_type());
        let interrupt = DeviceInterrupt::with_isr(&name, queues.len(), sink, isr);
        Ok(Self {
            device,
            mem,
            interrupt,
            bar,
            msix_vectors,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
            active: false,
        })
    }

    pub fn pci_ids(&self) -> PciIds {
        PciIds::for_device_type(self.device.device_type())
    }

    /// The vendor capabilities to put in the PCI capability list (COMMON, ISR, NOTIFY, and
    /// DEVICE if the device has configuration).
    pub fn capabilities(&self) -> Vec<VirtioPciCap> {
        let cap = |cfg_type, offset: u64, length: u64| VirtioPciCap {
            cfg_type,
            bar: self.bar,
            offset: offset as u32,
            length: length as u32,
            notify_off_multiplier: None,
        };
        let mut caps = vec![
            cap(cfg_type::COMMON, COMMON_OFFSET, COMMON_LEN),
            cap(cfg_type::ISR, ISR_OFFSET, ISR_LEN),
            VirtioPciCap {
                notify_off_multiplier: Some(NOTIFY_OFF_MULTIPLIER),
                ..cap(
                    cfg_type::NOTIFY,
                    NOTIFY_OFFSET,
                    self.queues.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                )
            },
        ];
        if self.device.config_size() > 0 {
            caps.push(cap(
                cfg_type::DEVICE,
                DEVICE_OFFSET,
                self.device.config_size() as u64,
            ));
        }
        caps
    }

    /// `(offset in the BAR, eventfd)` per queue: register each at BAR base + offset as a KVM
    /// ioeventfd (any length, no datamatch) so notifications bypass the vCPU thread.
    pub fn notify_events(&self) -> Vec<(u64, &EventFd)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| (notify_offset(i), &q.event))
            .collect()
    }

    /// The device status as the driver reads it (including `DEVICE_NEEDS_RESET`).
    pub fn device_status(&self) -> u8 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// A guest read of `data.len()` bytes at `offset` in the BAR. Unmapped bytes read as 0.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        if end <= COMMON_OFFSET + COMMON_LEN {
            let image = self.common_image();
            let start = (offset - COMMON_OFFSET) as usize;
            data.copy_from_slice(&image[start..start + data.len()]);
        } else if offset == ISR_OFFSET && !data.is_empty() {
            data[0] = self.interrupt.isr().read_and_clear();
        } else if offset >= DEVICE_OFFSET && end <= DEVICE_OFFSET + self.device.config_size() as u64
        {
            self.device.read_config(offset - DEVICE_OFFSET, data);
        }
        // Notification region reads and gaps: zeros.
    }

    /// A guest write of `data` at `offset` in the BAR. Accesses that match no register (odd
    /// sizes, gaps, read-only fields) are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        if end <= COMMON_OFFSET + COMMON_LEN {
            self.write_common(offset - COMMON_OFFSET, data);
        } else if offset >= DEVICE_OFFSET && end <= DEVICE_OFFSET + self.device.config_size() as u64
        {
            self.device.write_config(offset - DEVICE_OFFSET, data);
        } else if offset >= NOTIFY_OFFSET && end <= BAR_SIZE {
            let rel = offset - NOTIFY_OFFSET;
            let queue = (rel / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
            if rel % u64::from(NOTIFY_OFF_MULTIPLIER) == 0 {
                if let Some(q) = self.queues.get(queue) {
                    if let Err(e) = q.event.write(1) {
                        tracing::warn!("virtio: queue {queue} notify: {e}");
                    }
                }
            }
        }
    }

    /// The common configuration structure as the driver sees it now.
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            b[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        };
        let feature_word = match self.device_feature_select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        };
        let driver_word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(DEVICE_FEATURE, &feature_word.to_le_bytes());
        put(
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(DRIVER_FEATURE, &driver_word.to_le_bytes());
        put(
            CONFIG_MSIX_VECTOR,
            &self.interrupt.config_vector().to_le_bytes(),
        );
        put(NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.device_status()]);
        put(CONFIG_GENERATION, &[self.interrupt.config_generation()]);
        put(QUEUE_SELECT, &self.queue_select.to_le_bytes());
        let sel = self.queue_select as usize;
        if let Some(q) = self.queues.get(sel) {
            put(QUEUE_SIZE, &q.size.to_le_bytes());
            put(
                QUEUE_MSIX_VECTOR,
                &self.interrupt.queue_vector(sel).to_le_bytes(),
            );
            put(QUEUE_ENABLE, &u16::from(q.enabled).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &(sel as u16).to_le_bytes());
            put(QUEUE_DESC, &q.desc.to_le_bytes());
            put(QUEUE_DRIVER, &q.driver.to_le_bytes());
            put(QUEUE_DEVICE, &q.device.to_le_bytes());
        }
        // A queue_select past the last queue reads queue_size 0: "not available".
        b
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return,
        };
        let size = data.len();
        let before_features_ok = self.status & status::FEATURES_OK == 0;
        let configuring = self.status & status::DRIVER_OK == 0;
        match (offset, size) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) if before_features_ok => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= value << shift;
            }
            (CONFIG_MSIX_VECTOR, 2) => {
                let v = self.checked_vector(value as u16);
                self.interrupt.set_config_vector(v);
            }
            (DEVICE_STATUS, 1) => self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            _ if !configuring => {} // queue setup is frozen once the device runs
            (QUEUE_MSIX_VECTOR, 2) => {
                let v = self.checked_vector(value as u16);
                self.interrupt
                    .set_queue_vector(self.queue_select as usize, v);
            }
            (QUEUE_SIZE | QUEUE_ENABLE, 2)
            | (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 8)
            | (QUEUE_DESC | 0x24 | QUEUE_DRIVER | 0x2c | QUEUE_DEVICE | 0x34, 4) => {
                self.write_queue(offset, size, value)
            }
            _ => {}
        }
    }

    fn write_queue(&mut self, offset: u64, size: usize, value: u64) {
        let sel = self.queue_select as usize;
        let Some(q) = self.queues.get_mut(sel) else {
            return;
        };
        if q.enabled {
            return; // the spec forbids reconfiguring an enabled queue
        }
        let set = |field: &mut u64, high: bool| match (size, high) {
            (8, _) => *field = value,
            (_, false) => *field = (*field & !0xffff_ffff) | value,
            (_, true) => *field = (*field & 0xffff_ffff) | (value << 32),
        };
        match offset {
            QUEUE_SIZE => q.size = value as u16,
            QUEUE_DESC | 0x24 => set(&mut q.desc, offset == 0x24),
            QUEUE_DRIVER | 0x2c => set(&mut q.driver, offset == 0x2c),
            QUEUE_DEVICE | 0x34 => set(&mut q.device, offset == 0x34),
            QUEUE_ENABLE if value == 1 => {
                let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
                match q.build(&self.mem, event_idx) {
                    Ok(_) => q.enabled = true,
                    Err(why) => self
                        .interrupt
                        .set_needs_reset(&format_args!("queue {sel}: {why}")),
                }
            }
            _ => {}
        }
    }

    /// A vector the MSI-X table has, or NO_VECTOR (which the driver reads back as a refusal).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        let mut new = self.status | value;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            new &= !status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            } else {
                self.status = new;
                self.activate();
                return;
            }
        }
        self.status = new;
    }

    /// FEATURES_OK is granted to a driver that went through ACKNOWLEDGE and DRIVER, accepts
    /// VERSION_1 and nothing the device did not offer.
    fn features_acceptable(&self) -> bool {
        let handshake = status::ACKNOWLEDGE | status::DRIVER;
        self.status & handshake == handshake
            && self.driver_features & features::VERSION_1 != 0
            && self.driver_features & !self.offered == 0
    }

    fn activate(&mut self) {
        if self.active {
            return;
        }
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, slot) in self.queues.iter().enumerate() {
            if !slot.enabled {
                continue;
            }
            let queue = match slot.build(&self.mem, event_idx) {
                Ok(q) => q,
                Err(why) => {
                    // Memory can change between enable and DRIVER_OK (hot-unplug).
                    self.interrupt
                        .set_needs_reset(&format_args!("queue {index}: {why}"));
                    return;
                }
            };
            let event = match slot.event.try_clone() {
                Ok(e) => e,
                Err(e) => {
                    self.interrupt
                        .set_needs_reset(&format_args!("queue {index} eventfd: {e}"));
                    return;
                }
            };
            queues.push(ActivatedQueue {
                index,
                queue,
                event,
            });
        }
        match self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.active = true,
            Err(e) => {
                // A device that started threads before failing must stop them.
                self.device.reset();
                self.interrupt
                    .set_needs_reset(&format_args!("activation failed: {e}"))
            }
        }
    }

    /// Device reset (the driver wrote 0 to device_status): stop the device, forget the
    /// negotiation and the queues.
    pub fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
            // Drop notifications that arrived before the reset.
            let _ = q.event.read();
        }
        self.interrupt.reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
    }
}

impl Drop for VirtioPciTransport {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

impl crate::bus::BusDevice for VirtioPciTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        VirtioPciTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        VirtioPciTransport::write(self, offset, data);
    }
}

/// Where queue `index`'s notifications land in the BAR.
pub fn notify_offset(index: usize) -> u64 {
    NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}
