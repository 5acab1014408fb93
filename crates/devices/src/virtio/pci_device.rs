//! A virtio device as a PCI function: the modern virtio-pci registers in BAR 0, MSI-X (table
//! and PBA) in BAR 2, and INTA# for drivers that leave MSI-X off. The transport does the virtio
//! work, the PCI segment the generic PCI work; this only puts them together.

use std::sync::Arc;

use super::interrupt::IsrStatus;
use super::pci_transport::{self, TransportError, VirtioPciTransport};
use super::{GuestMemoryHandle, NO_VECTOR, VirtioDevice, VirtioInterrupt};
use crate::irq::IrqLine;
use crate::pci::config::ConfigError;
use crate::pci::msix::MsixError;
use crate::pci::{
    BarKind, BarRequest, ConfigSpace, IntxPin, IoEventFd, MsiRouting, Msix, MsixInterrupts,
    MsixLayout, PciDevice, PciIds,
};

const REGS_BAR: u8 = 0;
const MSIX_BAR: u8 = 2;
const MIN_BAR_SIZE: u64 = 4096;
/// The Interrupt Pin register's INTA#.
const INTA: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("virtio transport: {0}")]
    Transport(#[from] TransportError),
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixError),
    #[error("PCI configuration space: {0}")]
    Config(#[from] ConfigError),
    #[error("INTx eventfds: {0}")]
    Intx(#[source] std::io::Error),
}

/// Where the transport's interrupts go: while MSI-X is enabled, the vector the driver chose for
/// the source; otherwise INTA#, which follows the ISR the device has just set.
struct PciSink {
    msix: MsixInterrupts,
    intx: Arc<IntxPin>,
}

impl VirtioInterrupt for PciSink {
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        {
            let mut msix = self.msix.lock();
            if msix.enabled() {
                if vector != NO_VECTOR {
                    msix.trigger(vector);
                }
                return Ok(());
            }
        }
        self.intx.assert()
    }
}

pub struct VirtioPciDevice {
    config: ConfigSpace,
    transport: VirtioPciTransport,
    msix: MsixInterrupts,
    intx: Arc<IntxPin>,
    msix_bar_size: u64,
}

impl VirtioPciDevice {
    /// MSI-X vectors a device needs: one per queue and one for configuration changes.
    pub fn vectors_for(device: &dyn VirtioDevice) -> u16 {
        device
            .queue_max_sizes()
            .len()
            .saturating_add(1)
            .min(usize::from(u16::MAX)) as u16
    }

    /// `lines` are the device's MSI-X vectors (already irqfds), [`Self::vectors_for`] of them.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryHandle,
        lines: Vec<IrqLine>,
        router: Arc<dyn MsiRouting>,
    ) -> Result<Self, VirtioPciError> {
        let vectors = lines.len() as u16;
        let ids = pci_transport::PciIds::for_device_type(device.device_type());
        let mut config = ConfigSpace::new(PciIds {
            vendor: ids.vendor_id,
            device: ids.device_id,
            revision: ids.revision_id,
            class: (ids.class_code >> 16) as u8,
            subclass: (ids.class_code >> 8) as u8,
            prog_if: ids.class_code as u8,
            subsystem_vendor: ids.subsystem_vendor_id,
            subsystem: ids.subsystem_id,
        });
        let mut layout = MsixLayout {
            vectors,
            table_bar: MSIX_BAR,
            table_offset: 0,
            pba_bar: MSIX_BAR,
            pba_offset: 0,
        };
        layout.pba_offset = layout.table_size() as u32;
        let msix_bar_size = (layout.table_size() + layout.pba_size())
            .next_power_of_two()
            .max(MIN_BAR_SIZE);
        let msix = MsixInterrupts::new(Msix::new(layout, lines, router, &mut config)?);
        // The segment fills in the Interrupt Line (the slot's GSI) and connects the pin.
        config.set_interrupt(INTA, 0);
        let isr = IsrStatus::default();
        let intx = Arc::new(IntxPin::new(Arc::new(isr.clone())).map_err(VirtioPciError::Intx)?);
        let sink = PciSink {
            msix: msix.clone(),
            intx: intx.clone(),
        };
        let transport =
            VirtioPciTransport::with_isr(device, mem, Arc::new(sink), REGS_BAR, vectors, isr)?;
        for cap in transport.capabilities() {
            // [id, next, body...]: the capability list links itself.
            let bytes = cap.bytes();
            config.add_capability(bytes[0], &bytes[2..], &vec![0; bytes.len() - 2])?;
        }
        Ok(Self {
            config,
            transport,
            msix,
            intx,
            msix_bar_size,
        })
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn bar_requests(&self) -> Vec<BarRequest> {
        let kind = BarKind::Memory32 {
            prefetchable: false,
        };
        vec![
            BarRequest {
                index: REGS_BAR,
                size: pci_transport::BAR_SIZE,
                kind,
            },
            BarRequest {
                index: MSIX_BAR,
                size: self.msix_bar_size,
                kind,
            },
        ]
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            REGS_BAR => self.transport.read(offset, data),
            // The segment serves the MSI-X table and PBA; anything else in that BAR is empty.
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == REGS_BAR {
            self.transport.write(offset, data);
        }
    }

    fn ioeventfds(&self) -> Vec<IoEventFd<'_>> {
        self.transport
            .notify_events()
            .into_iter()
            .map(|(offset, fd)| IoEventFd {
                bar: REGS_BAR,
                offset,
                fd,
            })
            .collect()
    }

    fn msix(&self) -> Option<&MsixInterrupts> {
        Some(&self.msix)
    }

    fn intx(&self) -> Option<&Arc<IntxPin>> {
        Some(&self.intx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::pci::msix::CONTROL_ENABLE;
    use crate::pci::{IntxLevel, MsiMessage};
    use crate::virtio::pci_transport::{ISR_OFFSET, notify_offset};
    use crate::virtio::{IsrStatus, Rng, features, status};

    struct NoRoutes;
    impl MsiRouting for NoRoutes {
        fn route(&self, _gsi: u32, _msg: MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x8000;
    const QSIZE: u16 = 8;

    struct Rig {
        dev: VirtioPciDevice,
        mem: GuestMemoryMmap,
        lines: Vec<IrqLine>,
        posted: u16,
    }

    impl Rig {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
            let rng: Box<dyn VirtioDevice> = Box::new(Rng::new());
            let lines: Vec<IrqLine> = (0..VirtioPciDevice::vectors_for(rng.as_ref()))
                .map(|i| IrqLine::new(24 + u32::from(i)).unwrap())
                .collect();
            let handle = GuestMemoryAtomic::new(mem.clone());
            let dev = VirtioPciDevice::new(rng, handle, lines.clone(), Arc::new(NoRoutes)).unwrap();
            Self {
                dev,
                mem,
                lines,
                posted: 0,
            }
        }

        fn w(&mut self, off: u64, len: usize, v: u64) {
            self.dev.write_bar(REGS_BAR, off, &v.to_le_bytes()[..len]);
        }

        fn isr(&mut self) -> u8 {
            let mut b = [0u8];
            self.dev.read_bar(REGS_BAR, ISR_OFFSET, &mut b);
            b[0]
        }

        /// The driver's bring-up of queue 0 (vectors chosen, MSI-X left as it is).
        fn start(&mut self) {
            let s = status::ACKNOWLEDGE | status::DRIVER;
            self.w(0x14, 1, u64::from(s));
            self.w(0x08, 4, 1);
            self.w(0x0c, 4, features::VERSION_1 >> 32);
            self.w(0x14, 1, u64::from(s | status::FEATURES_OK));
            self.w(0x10, 2, 0); // config changes: vector 0
            self.w(0x16, 2, 0);
            self.w(0x18, 2, u64::from(QSIZE));
            self.w(0x1a, 2, 1); // queue 0: vector 1
            self.w(0x20, 8, DESC);
            self.w(0x28, 8, AVAIL);
            self.w(0x30, 8, USED);
            self.w(0x1c, 2, 1);
            self.w(
                0x14,
                1,
                u64::from(s | status::FEATURES_OK | status::DRIVER_OK),
            );
        }

        /// Posts a 16-byte buffer at `addr` (descriptor `i`) and notifies queue 0.
        fn request(&mut self, i: u16, addr: u64) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&16u32.to_le_bytes());
            d[12..14].copy_from_slice(&(VRING_DESC_F_WRITE as u16).to_le_bytes());
            let m = &self.mem;
            m.write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
                .unwrap();
            let slot = u64::from(self.posted % QSIZE);
            m.write_obj(i, GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
            self.posted += 1;
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            m.write_obj(self.posted, GuestAddress(AVAIL + 2)).unwrap();
            self.w(notify_offset(0), 2, 0);
        }

        fn pin(&self) -> Arc<IntxPin> {
            self.dev.intx().unwrap().clone()
        }
    }

    /// Waits for the eventfd to be written; returns its counter (0 after the timeout).
    fn wait_fd(fd: &vmm_sys_util::eventfd::EventFd) -> u64 {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(n) = fd.read() {
                return n;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        0
    }

    #[test]
    fn without_msix_queue_and_config_interrupts_are_level_intx() {
        let mut r = Rig::new();
        assert_eq!(r.dev.config().interrupt_pin(), INTA);
        let pin = r.pin();
        r.start();
        r.request(0, BUF);
        assert_eq!(
            wait_fd(pin.trigger_fd()),
            1,
            "INTA# raised for the used buffer"
        );
        assert!(pin.pending());
        // The guest EOIs without having read the ISR: KVM lowers the line, we raise it again.
        pin.resampled().unwrap();
        assert_eq!(pin.trigger_fd().read().unwrap(), 1, "level: still pending");
        assert_eq!(r.isr(), IsrStatus::QUEUE, "the read is the acknowledgement");
        assert_eq!(r.isr(), 0, "and clears");
        assert!(!pin.pending());
        pin.resampled().unwrap();
        assert!(pin.trigger_fd().read().is_err(), "acknowledged: stays low");
        for l in &r.lines {
            assert!(l.eventfd().read().is_err(), "no MSI-X while it is disabled");
        }

        // A descriptor outside memory breaks the device: a config change, ISR bit 1.
        r.request(1, 1 << 20);
        assert_eq!(wait_fd(pin.trigger_fd()), 1);
        assert_eq!(r.isr() & IsrStatus::CONFIG, IsrStatus::CONFIG);
        let mut st = [0u8];
        r.dev.read_bar(REGS_BAR, 0x14, &mut st);
        assert_ne!(st[0] & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn with_msix_enabled_interrupts_take_the_vector_not_intx() {
        let mut r = Rig::new();
        let pin = r.pin();
        {
            let msix = r.dev.msix().unwrap().clone();
            let mut m = msix.lock();
            m.write_table(16, &0xfee0_0000u64.to_le_bytes());
            m.write_table(24, &0x41u64.to_le_bytes()); // data 0x41, unmasked
            m.set_control(CONTROL_ENABLE);
        }
        r.start();
        r.request(0, BUF);
        assert_eq!(wait_fd(r.lines[1].eventfd()), 1, "queue 0's vector");
        std::thread::sleep(Duration::from_millis(20));
        assert!(pin.trigger_fd().read().is_err(), "INTx stays quiet");
        // The ISR is still set (MSI-X drivers never read it): the pin's condition holds, which
        // is what a later switch back to INTx would raise.
        assert_eq!(r.isr(), IsrStatus::QUEUE);
    }

    #[test]
    fn isr_is_the_intx_level() {
        let isr = IsrStatus::default();
        let shared = isr.clone();
        assert!(!shared.asserted());
        isr.set(IsrStatus::CONFIG);
        assert!(shared.asserted());
        assert_eq!(shared.read_and_clear(), IsrStatus::CONFIG);
        assert!(!isr.asserted());
    }
}
