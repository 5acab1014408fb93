//! What a PCI function implements to sit on the [`PciSegment`](super::PciSegment).
//!
//! The segment does the generic PCI work so a device does not have to:
//! - **configuration space**: the device owns a [`ConfigSpace`] (ids, capabilities); the segment
//!   applies guest accesses to it (write masks, BAR sizing) and then calls
//!   [`PciDevice::config_written`] / [`PciDevice::config_read`] for device-specific registers
//!   (e.g. virtio's `VIRTIO_PCI_CAP_PCI_CFG` window);
//! - **BARs**: the device asks for them with [`PciDevice::bar_requests`]; the segment places them
//!   (vm-allocator), programs the BAR registers, follows the guest when it moves them, and sends
//!   guest MMIO accesses to [`PciDevice::read_bar`] / [`PciDevice::write_bar`] with the offset
//!   inside the BAR;
//! - **MSI-X**: a device that returns its [`MsixInterrupts`] from [`PciDevice::msix`] never sees
//!   accesses to its MSI-X table or PBA, nor writes to the MSI-X message control: the segment
//!   serves them, and the device only calls [`MsixInterrupts::trigger`];
//! - **INTx**: a device that declares an interrupt pin in its config space and returns an
//!   [`IntxPin`] from [`PciDevice::intx`] gets the pin connected to the slot's GSI (the Interrupt
//!   Line register says which), masked while Interrupt Disable is set or MSI-X is enabled, and its
//!   condition shown as the status register's Interrupt Status bit; the device only calls
//!   [`IntxPin::assert`];
//! - **ioeventfds**: [`PciDevice::ioeventfds`] lists the (BAR, offset, eventfd) notification
//!   addresses; the segment registers them with KVM (any access length, no datamatch) wherever the
//!   BAR currently is, so a guest write there only signals the eventfd, without a vCPU exit to us.
//!
//! A typical device: build a `ConfigSpace`, add its capabilities, create `Msix::new(...)` on it
//! with the vectors the VMM allocated, and hand `Arc<Mutex<dyn PciDevice>>` to the segment.

use vmm_sys_util::eventfd::EventFd;

use std::sync::Arc;

use crate::pci::config::{BarKind, ConfigSpace};
use crate::pci::intx::IntxPin;
use crate::pci::msix::MsixInterrupts;

/// One BAR a device wants: `size` is a power of two (>= 16); the segment picks the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRequest {
    pub index: u8,
    pub size: u64,
    /// `Memory64` BARs are placed above 4 GiB, `Memory32` in the 32-bit hole. I/O BARs are not
    /// supported by the segment (virtio 1.x and MSI-X need none).
    pub kind: BarKind,
}

/// A notification address: a guest write (of any length and value) at `offset` inside BAR `bar`
/// signals `fd` instead of exiting to the VMM (KVM_IOEVENTFD, MMIO, no datamatch).
pub struct IoEventFd<'a> {
    pub bar: u8,
    pub offset: u64,
    pub fd: &'a EventFd,
}

/// A PCI function (function 0 of its slot).
pub trait PciDevice: Send {
    /// The function's configuration space; the segment applies guest accesses to it.
    fn config(&mut self) -> &mut ConfigSpace;

    /// The BARs to place, asked once when the device is added to the segment.
    fn bar_requests(&self) -> Vec<BarRequest>;

    /// Guest read inside BAR `bar` at `offset` (relative to the BAR's start). `data` is 1..=8
    /// bytes and never crosses the end of the BAR.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// Guest write inside BAR `bar` at `offset`; same guarantees as [`PciDevice::read_bar`].
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// Notification addresses to register with KVM. Must return the same eventfds every time
    /// (the segment asks again to unregister them when the guest moves a BAR).
    fn ioeventfds(&self) -> Vec<IoEventFd<'_>> {
        Vec::new()
    }

    /// The function's MSI-X state, if it has an MSI-X capability.
    fn msix(&self) -> Option<&MsixInterrupts> {
        None
    }

    /// The function's INTx pin, if its config space declares one (Interrupt Pin 1..=4).
    fn intx(&self) -> Option<&Arc<IntxPin>> {
        None
    }

    /// Called after the guest wrote `data` at `offset` in configuration space (already merged
    /// under the write masks; BAR moves and MSI-X control are already handled).
    fn config_written(&mut self, _offset: usize, _data: &[u8]) {}

    /// Called after `data` was filled from configuration space at `offset`: the device may
    /// replace what the guest sees (registers with read side effects).
    fn config_read(&mut self, _offset: usize, _data: &mut [u8]) {}
}

/// Where KVM's ioeventfds are registered: implemented by the VMM.
pub trait IoEventRegistry: Send + Sync {
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()>;
    fn unregister(&self, addr: u64, fd: &EventFd) -> std::io::Result<()>;
}
