//! The VMM side of PCI: the segment on the PIO/MMIO buses, KVM's interrupt routing table (one
//! place for IOAPIC and MSI routes), MSI vector allocation (GSI + irqfd), INTx pins (irqfds with
//! a resample fd on the IOAPIC GSIs of the `_PRT`), and ioeventfds.
//!
//! Adding a PCI device is one line in `machine.rs`: `pci.add_device(Arc::new(Mutex::new(dev)))`;
//! [`Pci::remove_device`] undoes it (hotplug, `hotplug.rs`).
//! A device with MSI-X first gets its vectors' interrupt lines from [`Pci::msi_lines`] and the
//! routing handle from [`Pci::msi_routing`], for `hyperpool_devices::pci::Msix::new`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hyperpool_acpi::PciConfig;
use hyperpool_devices::pci::{
    IntxPin, IntxResampler, IntxRouting, IoEventRegistry, MsiMessage, MsiRouting, PciConfigIo,
    PciEcam, PciMmioWindow, PciSegment, SharedPciDevice, SharedSegment, Window, intx_gsi,
    segment::NUM_SLOTS,
};
use hyperpool_devices::{Bus, IrqLine};
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{
    IOAPIC_PINS, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START, PCI_MMIO64_SIZE,
    pci_mmio64_start,
};
use crate::error::{Error, Result};

/// Highest GSI handed to MSI vectors (KVM's routing table holds 4096 entries on x86).
const MAX_GSI: u32 = 4095;

/// KVM's GSI routing table. Setting it replaces the whole table, including the default routes
/// the in-kernel irqchip starts with, so those are re-stated every time. Nothing is set until the
/// first MSI route: boot pays for no ioctl.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    gsis: Mutex<IdAllocator>,
    /// Serves the INTx pins' resample fds; lives (and its thread with it) as long as the
    /// segment and the devices' MSI-X state hold this router.
    resampler: IntxResampler,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Result<Self> {
        let gsis = IdAllocator::new(IOAPIC_PINS, MAX_GSI)
            .map_err(|e| Error::Devices(format!("GSI allocator: {e}")))?;
        Ok(Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
            gsis: Mutex::new(gsis),
            resampler: IntxResampler::new(),
        })
    }

    /// `count` interrupt lines on fresh GSIs, each registered with KVM as an irqfd.
    pub fn msi_lines(&self, count: u16) -> Result<Vec<IrqLine>> {
        let mut gsis = self.gsis.lock().unwrap_or_else(|p| p.into_inner());
        (0..count)
            .map(|_| {
                let gsi = gsis
                    .allocate_id()
                    .map_err(|e| Error::Devices(format!("out of GSIs for MSI: {e}")))?;
                let line = IrqLine::new(gsi).map_err(Error::io("creating an MSI eventfd"))?;
                self.vm
                    .register_irqfd(line.eventfd(), gsi)
                    .map_err(Error::kvm("registering an MSI irqfd"))?;
                Ok(line)
            })
            .collect()
    }

    /// Gives back the lines of an unplugged device: irqfds unregistered, MSI routes dropped,
    /// GSIs free for the next device.
    pub fn release(&self, lines: &[IrqLine]) {
        let mut gsis = self.gsis.lock().unwrap_or_else(|p| p.into_inner());
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        let mut routed = false;
        for line in lines {
            if let Err(e) = self.vm.unregister_irqfd(line.eventfd(), line.gsi()) {
                tracing::warn!("unregistering the irqfd of GSI {}: {e}", line.gsi());
            }
            routed |= msi.remove(&line.gsi()).is_some();
            if let Err(e) = gsis.free_id(line.gsi()) {
                tracing::warn!("freeing GSI {}: {e}", line.gsi());
            }
        }
        if routed {
            let result = routing_table(&msi).and_then(|table| {
                self.vm
                    .set_gsi_routing(&table)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            });
            if let Err(e) = result {
                tracing::warn!("dropping the MSI routes of an unplugged device: {e}");
            }
        }
    }
}

/// The routes KVM installs with the in-kernel irqchip (virt/kvm/irqchip.c, x86 default_routing):
/// GSIs 0..16 to both the IOAPIC pin and the PIC, 16..24 to the IOAPIC only.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        routes.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(chip(gsi, pic, gsi % 8));
        }
    }
    routes
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> std::io::Result<KvmIrqRouting> {
    let mut entries = default_routes();
    entries.extend(msi.iter().map(|(&gsi, &msg)| msi_route(gsi, msg)));
    KvmIrqRouting::from_entries(&entries)
        .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))
}

impl MsiRouting for GsiRouter {
    fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        let previous = msi.insert(gsi, msg);
        let result = routing_table(&msi).and_then(|table| {
            self.vm
                .set_gsi_routing(&table)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        });
        if result.is_err() {
            // A route KVM refused must not ride along with every later update.
            match previous {
                Some(old) => msi.insert(gsi, old),
                None => msi.remove(&gsi),
            };
        }
        result
    }
}

/// INTx pins on the IOAPIC GSIs 16..20: their default routes (re-stated with every routing
/// update) point at IOAPIC pins, which KVM_IRQFD_FLAG_RESAMPLE requires.
impl IntxRouting for GsiRouter {
    fn connect(&self, gsi: u32, pin: Arc<IntxPin>) -> std::io::Result<()> {
        self.vm
            .register_irqfd_with_resample(pin.trigger_fd(), pin.resample_fd(), gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.resampler.add(pin)
    }

    fn disconnect(&self, gsi: u32, pin: &Arc<IntxPin>) -> std::io::Result<()> {
        self.resampler.remove(pin)?;
        self.vm
            .unregister_irqfd(pin.trigger_fd(), gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// KVM_IOEVENTFD on MMIO addresses, any access length, no datamatch.
struct KvmIoEvents(Arc<VmFd>);

impl IoEventRegistry for KvmIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// The PCI windows for a guest with `mem_size` bytes of RAM.
fn windows(mem_size: u64) -> (Window, Window) {
    (
        Window {
            start: PCI_MMIO32_START,
            size: PCI_MMIO32_SIZE,
        },
        Window {
            start: pci_mmio64_start(mem_size),
            size: PCI_MMIO64_SIZE,
        },
    )
}

/// What the DSDT and MCFG say about PCI; the same map the segment implements.
pub fn acpi_config(mem_size: u64) -> PciConfig {
    let (w32, w64) = windows(mem_size);
    PciConfig {
        ecam_base: PCI_ECAM_START,
        bus_end: (PCI_ECAM_SIZE >> 20) as u8 - 1,
        mmio32: (w32.start, w32.end()),
        mmio64: (w64.start, w64.end()),
        intx_routes: (1..NUM_SLOTS as u8)
            .flat_map(|slot| (0..4).map(move |pin| (slot, pin, intx_gsi(slot, pin))))
            .collect(),
    }
}

/// The PCI root complex of one VM.
pub struct Pci {
    segment: SharedSegment,
    router: Arc<GsiRouter>,
    windows: (Window, Window),
}

impl Pci {
    pub fn new(vm: &Arc<VmFd>, mem_size: u64) -> Result<Self> {
        let windows = windows(mem_size);
        let router = Arc::new(GsiRouter::new(vm.clone())?);
        let segment = PciSegment::new(
            windows.0,
            windows.1,
            Arc::new(KvmIoEvents(vm.clone())),
            router.clone(),
        )
        .map_err(|e| Error::Devices(format!("PCI: {e}")))?;
        Ok(Self {
            segment: Arc::new(Mutex::new(segment)),
            router,
            windows,
        })
    }

    fn segment(&self) -> std::sync::MutexGuard<'_, PciSegment> {
        self.segment.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plugs a device into the next free slot; returns the slot.
    pub fn add_device(&self, device: SharedPciDevice) -> Result<u8> {
        self.segment()
            .add_device(device)
            .map_err(|e| Error::Devices(format!("PCI: {e}")))
    }

    /// The slot the next device would get, if one is free.
    pub fn free_slot(&self) -> Option<u8> {
        self.segment().free_slot()
    }

    /// Unplugs the device in `slot` and gives back its MSI-X `lines`; returns the device (to be
    /// dropped, which stops its threads and closes its files), or `None` if the slot was empty.
    pub fn remove_device(&self, slot: u8, lines: &[IrqLine]) -> Option<SharedPciDevice> {
        let device = self.segment().remove_device(slot)?;
        self.router.release(lines);
        Some(device)
    }

    /// Interrupt lines (GSI + irqfd) for `count` MSI-X vectors.
    pub fn msi_lines(&self, count: u16) -> Result<Vec<IrqLine>> {
        self.router.msi_lines(count)
    }

    /// Gives back lines from [`Pci::msi_lines`] that no device got.
    pub fn release_lines(&self, lines: &[IrqLine]) {
        self.router.release(lines);
    }

    /// What MSI-X uses to point its vectors' GSIs at the guest's messages.
    pub fn msi_routing(&self) -> Arc<dyn MsiRouting> {
        self.router.clone()
    }

    /// Maps 0xCF8..0xD00, the ECAM window and both BAR windows.
    pub fn attach(&self, pio: &mut Bus, mmio: &mut Bus) -> Result<()> {
        let bus_err = |e: hyperpool_devices::BusError| Error::Devices(format!("PCI: {e}"));
        let seg = &self.segment;
        pio.insert(
            u64::from(PciConfigIo::PORT),
            PciConfigIo::PORT_SPAN,
            Arc::new(Mutex::new(PciConfigIo::new(seg.clone()))),
        )
        .map_err(bus_err)?;
        mmio.insert(
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam::new(seg.clone()))),
        )
        .map_err(bus_err)?;
        for w in [self.windows.0, self.windows.1] {
            mmio.insert(
                w.start,
                w.size,
                Arc::new(Mutex::new(PciMmioWindow::new(seg.clone(), w.start))),
            )
            .map_err(bus_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_the_ioapic_and_the_pics() {
        let routes = default_routes();
        assert_eq!(routes.len(), 24 + 16);
        assert!(routes.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        assert_eq!(routes.iter().filter(|e| e.gsi < 16).count(), 32);
        assert_eq!(routes.last().unwrap().gsi, 23);
    }

    #[test]
    fn acpi_and_segment_agree_on_the_map() {
        let c = acpi_config(1 << 30);
        assert_eq!(c.ecam_base, PCI_ECAM_START);
        assert_eq!(c.bus_end, 0);
        assert_eq!(c.mmio32, (0xc000_0000, 0xe000_0000));
        assert_eq!(c.mmio64, (4 << 30, 68 << 30));
        assert_eq!(c.intx_routes.len(), 31 * 4);
        assert_eq!(c.intx_routes[0], (1, 0, 17));
    }
}
