//! PCI as the guest reaches it: configuration space through ECAM and ports 0xCF8/0xCFC, BARs
//! through the MMIO windows, MSI-X table and PBA, and the virtio-pci transport registers — on a
//! real `PciSegment` holding a `VirtioPciDevice` (a stand-in virtio device behind the real
//! transport and MSI-X) and a function with 64-bit BARs.
//!
//! Checked after every access: read-only ids stay put; the ioeventfds registered are exactly
//! those of the BARs that decode now (never registered twice, never unregistered unknown);
//! the segment hands devices only accesses inside their BARs, and the transport only config
//! accesses inside the device's config space; queues handed to a device are valid. BAR sizing
//! (write all-ones, read back) gives the size mask and type bits, and restoring the old value
//! brings it back.

#![no_main]

use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use hyperpool_devices::BusDevice;
use hyperpool_devices::IrqLine;
use hyperpool_devices::pci::config::COMMAND_MEMORY;
use hyperpool_devices::pci::{
    BarKind, BarRequest, ConfigSpace, IoEventFd, IoEventRegistry, MsiMessage, MsiRouting,
    PciConfigIo, PciDevice, PciEcam, PciIds, PciMmioWindow, PciSegment, SharedPciDevice,
    SharedSegment, Window,
};
use hyperpool_devices::virtio::device::{ActivateError, ActivatedQueue};
use hyperpool_devices::virtio::{
    DeviceInterrupt, GuestMemoryHandle, VirtioDevice, VirtioPciDevice, features,
};
use hyperpool_fuzz::pci_case::{self, Op, kind};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MMIO32: Window = Window {
    start: 0xc000_0000,
    size: 0x2000_0000,
};
const MMIO64: Window = Window {
    start: 1 << 36,
    size: 64 << 30,
};
const SLOTS: usize = 4; // host bridge, virtio, wide, empty
const VIRTIO_SLOT: usize = 1;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// KVM's ioeventfd table as the segment drives it: adding one twice or removing one that is not
/// there fails in KVM, so here it panics.
#[derive(Default)]
struct Registry(Mutex<HashSet<(u64, RawFd)>>);

impl IoEventRegistry for Registry {
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        let fresh = lock(&self.0).insert((addr, fd.as_raw_fd()));
        assert!(fresh, "ioeventfd registered twice at {addr:#x}");
        Ok(())
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        let known = lock(&self.0).remove(&(addr, fd.as_raw_fd()));
        assert!(
            known,
            "unregistering an ioeventfd not registered at {addr:#x}"
        );
        Ok(())
    }
}

struct NoRouting;

impl MsiRouting for NoRouting {
    fn route(&self, _gsi: u32, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

const CONFIG_LEN: usize = 24;
const DUMMY_QUEUES: [u16; 2] = [256, 16];

/// A virtio device that only checks what the transport hands it.
struct Dummy {
    config: [u8; CONFIG_LEN],
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &DUMMY_QUEUES
    }

    fn features(&self) -> u64 {
        features::BASE | 1 << 5 | 1 << 9
    }

    fn config_size(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let at = offset as usize;
        assert!(
            at + data.len() <= CONFIG_LEN,
            "config read at {offset:#x}+{}",
            data.len()
        );
        data.copy_from_slice(&self.config[at..at + data.len()]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        assert!(
            at + data.len() <= CONFIG_LEN,
            "config write at {offset:#x}+{}",
            data.len()
        );
        self.config[at..at + data.len()].copy_from_slice(data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        _features: u64,
        queues: Vec<ActivatedQueue>,
        _interrupt: DeviceInterrupt,
    ) -> Result<(), ActivateError> {
        let mut last = None;
        for q in &queues {
            assert!(q.index < DUMMY_QUEUES.len());
            assert!(last < Some(q.index), "queues out of order or repeated");
            last = Some(q.index);
            assert!(
                q.queue.is_valid(&*mem.memory()),
                "an invalid queue was activated"
            );
        }
        Ok(())
    }

    fn reset(&mut self) {}
}

/// A function with a 64-bit prefetchable BAR, a 64-bit BAR and a 32-bit one, an INTx pin and
/// two notification addresses; it checks the segment keeps accesses inside its BARs.
struct Wide {
    config: ConfigSpace,
    events: [EventFd; 2],
}

const WIDE_BARS: [BarRequest; 3] = [
    BarRequest {
        index: 0,
        size: 1 << 20,
        kind: BarKind::Memory64 { prefetchable: true },
    },
    BarRequest {
        index: 2,
        size: 1 << 32,
        kind: BarKind::Memory64 {
            prefetchable: false,
        },
    },
    BarRequest {
        index: 5,
        size: 16,
        kind: BarKind::Memory32 {
            prefetchable: false,
        },
    },
];

impl Wide {
    fn new() -> Self {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1234,
            device: 0x5678,
            class: 0xff,
            ..Default::default()
        });
        config.set_interrupt(1, 0);
        let ev = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Self {
            config,
            events: [ev(), ev()],
        }
    }

    fn check(&self, bar: u8, offset: u64, len: usize) {
        let size = WIDE_BARS.iter().find(|b| b.index == bar).map(|b| b.size);
        assert!((1..=8).contains(&len), "BAR access of {len} bytes");
        assert!(
            size.is_some_and(|s| offset + len as u64 <= s),
            "access to BAR {bar} at {offset:#x}+{len} is outside it"
        );
    }
}

impl PciDevice for Wide {
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn bar_requests(&self) -> Vec<BarRequest> {
        WIDE_BARS.to_vec()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.check(bar, offset, data.len());
        data.fill(bar ^ offset as u8);
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.check(bar, offset, data.len());
    }

    fn ioeventfds(&self) -> Vec<IoEventFd<'_>> {
        vec![
            IoEventFd {
                bar: 0,
                offset: 0x80,
                fd: &self.events[0],
            },
            IoEventFd {
                bar: 5,
                offset: 0,
                fd: &self.events[1],
            },
        ]
    }
}

/// The value BAR `index` reads back after all-ones were written to it.
fn sizing_mask(bars: &[BarRequest], index: u8) -> u32 {
    for b in bars {
        let mask = !(b.size - 1);
        let flags = match b.kind {
            BarKind::Io => 0b01,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0b100 | u32::from(prefetchable) << 3,
        };
        if b.index == index {
            return (mask as u32 & !0xf) | flags;
        }
        if b.kind.is_64bit() && b.index + 1 == index {
            return (mask >> 32) as u32;
        }
    }
    0
}

/// INTx lines go nowhere: the target checks config space, not interrupt delivery.
struct Intx;

impl hyperpool_devices::pci::IntxRouting for Intx {
    fn connect(
        &self,
        _gsi: u32,
        _pin: Arc<hyperpool_devices::pci::IntxPin>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn disconnect(
        &self,
        _gsi: u32,
        _pin: &Arc<hyperpool_devices::pci::IntxPin>,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

struct Machine {
    segment: SharedSegment,
    devices: Vec<Option<(SharedPciDevice, Vec<BarRequest>)>>,
    registry: Arc<Registry>,
    ecam: PciEcam,
    cf8: PciConfigIo,
    windows: [PciMmioWindow; 2],
    ids: [u32; SLOTS],
}

impl Machine {
    fn new() -> Self {
        let registry = Arc::new(Registry::default());
        let mut segment =
            PciSegment::new(MMIO32, MMIO64, registry.clone(), Arc::new(Intx)).expect("PCI segment");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
        let dummy = Box::new(Dummy {
            config: [0; CONFIG_LEN],
        });
        let vectors = VirtioPciDevice::vectors_for(dummy.as_ref());
        let lines = (0..vectors)
            .map(|i| IrqLine::new(24 + u32::from(i)).expect("irq line"))
            .collect();
        let virtio = VirtioPciDevice::new(
            dummy,
            GuestMemoryAtomic::new(mem),
            lines,
            Arc::new(NoRouting),
        )
        .expect("virtio-pci device");
        let mut devices = vec![None];
        for dev in [
            Arc::new(Mutex::new(virtio)) as SharedPciDevice,
            Arc::new(Mutex::new(Wide::new())) as SharedPciDevice,
        ] {
            let bars = lock(&dev).bar_requests();
            let slot = segment.add_device(dev.clone()).expect("adding a device");
            assert_eq!(usize::from(slot), devices.len());
            devices.push(Some((dev, bars)));
        }
        devices.push(None);
        let segment = Arc::new(Mutex::new(segment));
        let mut m = Self {
            ecam: PciEcam::new(segment.clone()),
            cf8: PciConfigIo::new(segment.clone()),
            windows: [
                PciMmioWindow::new(segment.clone(), MMIO32.start),
                PciMmioWindow::new(segment.clone(), MMIO64.start),
            ],
            segment,
            devices,
            registry,
            ids: [0; SLOTS],
        };
        for slot in 0..SLOTS {
            m.ids[slot] = m.config_read32(slot, 0);
        }
        assert_eq!(m.ids[SLOTS - 1], u32::MAX, "an empty slot reads all-ones");
        m
    }

    fn ecam_offset(slot: usize, reg: usize) -> u64 {
        (slot as u64) << 15 | reg as u64
    }

    fn config_read32(&mut self, slot: usize, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        self.ecam.read(Self::ecam_offset(slot, reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn config_write32(&mut self, slot: usize, reg: usize, v: u32) {
        self.ecam
            .write(Self::ecam_offset(slot, reg), &v.to_le_bytes());
    }

    /// BAR `bar` of `slot`: where it decodes in the guest's programming, and its size.
    fn bar(&self, slot: usize, bar: u8) -> Option<(u64, u64)> {
        let (dev, bars) = self.devices.get(slot)?.as_ref()?;
        let size = bars.iter().find(|b| b.index == bar)?.size;
        let base = lock(dev).config().bar_address(bar.into())?;
        Some((base, size))
    }

    fn apply(&mut self, op: &Op) {
        let slot = usize::from(op.slot);
        let len = op.access_len();
        let mut data = [0u8; 8];
        let value = op.value.to_le_bytes();
        match op.kind {
            kind::ECAM => {
                let at = if op.wide {
                    u64::from(op.offset)
                } else {
                    Self::ecam_offset(slot, op.offset as usize & 0xfff)
                };
                if op.read {
                    self.ecam.read(at, &mut data[..len]);
                } else {
                    self.ecam.write(at, &value[..len]);
                }
            }
            kind::CF8 => {
                if op.read {
                    self.cf8.read(0, &mut data[..4]);
                } else {
                    self.cf8.write(0, &value[..4]);
                }
            }
            kind::CFC => {
                let at = 4 + u64::from(op.offset & 3);
                if op.read {
                    self.cf8.read(at, &mut data[..len]);
                } else {
                    self.cf8.write(at, &value[..len]);
                }
            }
            kind::BAR => {
                let Some((base, size)) = self.bar(slot, op.bar) else {
                    return;
                };
                let Some(addr) = base.checked_add(u64::from(op.offset) % size) else {
                    return;
                };
                let segment = lock(&self.segment);
                if op.read {
                    segment.mmio_read(addr, &mut data[..len]);
                } else {
                    segment.mmio_write(addr, &value[..len]);
                }
            }
            kind::WINDOW => {
                let w = &mut self.windows[usize::from(op.wide)];
                if op.read {
                    w.read(op.offset.into(), &mut data[..len]);
                } else {
                    w.write(op.offset.into(), &value[..len]);
                }
            }
            kind::BAR_PROBE => self.probe_bar(slot, op.bar),
            kind::COMMAND => {
                let mut b = [0u8; 4];
                b[..2].copy_from_slice(&value[..2]);
                let status = self.config_read32(slot, 4) & 0xffff_0000;
                self.config_write32(slot, 4, status | u32::from_le_bytes(b));
            }
            _ => {
                let Some((dev, bars)) = &self.devices[VIRTIO_SLOT] else {
                    return;
                };
                let Some(b) = bars.iter().find(|b| b.index == op.bar) else {
                    return;
                };
                let offset = u64::from(op.offset) % (b.size - len as u64 + 1);
                let mut dev = lock(dev);
                if op.read {
                    dev.read_bar(b.index, offset, &mut data[..len]);
                } else {
                    dev.write_bar(b.index, offset, &value[..len]);
                }
            }
        }
    }

    /// BAR sizing as firmware and Linux do it.
    fn probe_bar(&mut self, slot: usize, bar: u8) {
        let reg = 0x10 + 4 * usize::from(bar);
        let old = self.config_read32(slot, reg);
        self.config_write32(slot, reg, u32::MAX);
        let mask = self.config_read32(slot, reg);
        self.config_write32(slot, reg, old);
        let expected = match &self.devices[slot] {
            Some((_, bars)) => sizing_mask(bars, bar),
            None if slot == 0 => 0,
            None => u32::MAX,
        };
        assert_eq!(mask, expected, "slot {slot} BAR {bar} sizing");
        assert_eq!(
            self.config_read32(slot, reg),
            old,
            "slot {slot} BAR {bar} restore"
        );
    }

    fn check(&mut self) {
        for slot in 0..SLOTS {
            let ids = self.config_read32(slot, 0);
            assert_eq!(ids, self.ids[slot], "slot {slot}: vendor/device id changed");
        }
        let mut want = HashSet::new();
        for (dev, _) in self.devices.iter().flatten() {
            let mut dev = lock(dev);
            if dev.config().command() & COMMAND_MEMORY == 0 {
                continue;
            }
            let bases: Vec<Option<u64>> = (0..6).map(|b| dev.config().bar_address(b)).collect();
            for ev in dev.ioeventfds() {
                if let Some(addr) =
                    bases[usize::from(ev.bar)].and_then(|b| b.checked_add(ev.offset))
                {
                    want.insert((addr, ev.fd.as_raw_fd()));
                }
            }
        }
        assert_eq!(
            *lock(&self.registry.0),
            want,
            "registered ioeventfds differ from the decoding BARs"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut m = Machine::new();
    for op in pci_case::decode(data) {
        m.apply(&op);
        m.check();
    }
});
