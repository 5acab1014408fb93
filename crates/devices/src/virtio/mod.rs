//! Virtio 1.x devices: the transport-agnostic device core, the modern virtio-pci register layout,
//! and the device models.
//!
//! - [`device`]: the [`VirtioDevice`] trait a device model implements, and what it is handed on
//!   activation ([`ActivatedQueue`]).
//! - [`interrupt`]: how a device tells the driver something ([`DeviceInterrupt`]), the interrupt
//!   sink the PCI side implements ([`VirtioInterrupt`]) and the ISR register ([`IsrStatus`]).
//! - [`chain`]: descriptor chains walked and checked ([`chain::collect_chain`]), and why a queue
//!   broke ([`chain::ChainError`]).
//! - [`counters`]: what devices did (bytes, requests, frames), counted without locks for the
//!   VMM's `vm.counters` ([`CounterSet`]).
//! - [`worker`]: the thread a device runs its queue work on, woken by the queue eventfds.
//! - [`pci_transport`]: the virtio-pci BAR (common config, ISR, notify, device config) and the
//!   vendor capabilities that describe it ([`VirtioPciTransport`]).
//! - [`rng`]: virtio-rng ([`Rng`]).
//! - [`vsock`]: virtio-vsock on host Unix sockets ([`Vsock`]).
//! - [`block`]: virtio-blk on raw images ([`Block`]).
//! - [`net`]: virtio-net on a TAP ([`Net`]).
//! - [`console`]: virtio-console, one port ([`Console`], host input through [`ConsoleInput`]).
//!
//! Everything the guest controls (registers, rings, descriptors) is treated as hostile: a bad value
//! never panics; a broken queue sets `DEVICE_NEEDS_RESET` and is logged once.

pub mod block;
pub mod chain;
pub mod console;
pub mod counters;
pub mod device;
pub mod interrupt;
pub mod net;
pub mod pci_device;
pub mod pci_transport;
pub mod queue_setup;
pub mod rng;
pub mod vsock;
pub mod worker;

#[cfg(test)]
mod tests;

pub use block::{Block, BlockCounters};
pub use console::{Console, ConsoleInput};
pub use counters::CounterSet;
pub use device::{ActivateError, ActivatedQueue, VirtioDevice};
pub use interrupt::{DeviceInterrupt, IsrStatus, VirtioInterrupt};
pub use net::{Net, NetCounters};
pub use pci_device::{VirtioPciDevice, VirtioPciError};
pub use pci_transport::{PciIds, VirtioPciCap, VirtioPciTransport};
pub use rng::{Rng, RngCounters};
pub use vsock::{Vsock, VsockCounters};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as devices hold it: swappable (hotplug) and shared with the device threads.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    pub const DEVICE_NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// Feature bits every device model may offer (device-specific bits live with the device).
pub mod features {
    use virtio_bindings::{virtio_config as c, virtio_ring as r};
    /// Virtio 1.x ("modern"): required by this transport.
    pub const VERSION_1: u64 = 1 << c::VIRTIO_F_VERSION_1;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << r::VIRTIO_RING_F_EVENT_IDX;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << r::VIRTIO_RING_F_INDIRECT_DESC;
    /// What every device here offers: the virtio 1.x transport and the ring features our
    /// queue handling supports. Devices add their own bits to it.
    pub const BASE: u64 = VERSION_1 | RING_EVENT_IDX | RING_INDIRECT_DESC;
}

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// The largest queue this transport lets a device offer (and a driver select).
pub const MAX_QUEUE_SIZE: u16 = 256;
