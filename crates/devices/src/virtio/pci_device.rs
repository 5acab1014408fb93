//! A virtio device as a PCI function: the modern virtio-pci registers in BAR 0 and MSI-X (table
//! and PBA) in BAR 2. The transport does the virtio work, the PCI segment the generic PCI work;
//! this only puts them together.

use std::sync::Arc;

use super::pci_transport::{self, TransportError, VirtioPciTransport};
use super::{GuestMemoryHandle, NO_VECTOR, VirtioDevice, VirtioInterrupt};
use crate::irq::IrqLine;
use crate::pci::config::ConfigError;
use crate::pci::msix::MsixError;
use crate::pci::{
    BarKind, BarRequest, ConfigSpace, IoEventFd, MsiRouting, Msix, MsixInterrupts, MsixLayout,
    PciDevice, PciIds,
};

const REGS_BAR: u8 = 0;
const MSIX_BAR: u8 = 2;
const MIN_BAR_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("virtio transport: {0}")]
    Transport(#[from] TransportError),
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixError),
    #[error("PCI configuration space: {0}")]
    Config(#[from] ConfigError),
}

/// Queue interrupts go to the MSI-X vector the driver chose for them.
struct MsixSink(MsixInterrupts);

impl VirtioInterrupt for MsixSink {
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        if vector != NO_VECTOR {
            self.0.trigger(vector);
        }
        Ok(())
    }
}

pub struct VirtioPciDevice {
    config: ConfigSpace,
    transport: VirtioPciTransport,
    msix: MsixInterrupts,
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
        let transport = VirtioPciTransport::new(
            device,
            mem,
            Arc::new(MsixSink(msix.clone())),
            REGS_BAR,
            vectors,
        )?;
        for cap in transport.capabilities() {
            // [id, next, body...]: the capability list links itself.
            let bytes = cap.bytes();
            config.add_capability(bytes[0], &bytes[2..], &vec![0; bytes.len() - 2])?;
        }
        Ok(Self {
            config,
            transport,
            msix,
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
}
