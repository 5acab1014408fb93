//! The trait a virtio device model implements, independent of the transport that carries it.
//!
//! The transport owns feature negotiation, the device status and queue configuration. When the
//! driver sets `DRIVER_OK`, it hands the device the negotiated features, its configured queues
//! (each with the eventfd the guest's notifications arrive on) and a [`DeviceInterrupt`]. The
//! device then serves its queues on its own thread ([`super::worker::QueueWorker`]), so a vCPU thread
//! never does device work. On reset it stops that thread before returning.

use vmm_sys_util::eventfd::EventFd;

use super::GuestMemoryHandle;
use super::interrupt::DeviceInterrupt;

/// One configured queue handed to a device on activation.
pub struct ActivatedQueue {
    /// The queue's index in the device (0-based).
    pub index: usize,
    /// Ring addresses, size and event-idx already set; validated against guest memory.
    pub queue: virtio_queue::Queue,
    /// Becomes readable when the guest notifies this queue (ioeventfd, or the transport's
    /// notify region).
    pub event: EventFd,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot start the device thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`, e.g. 4 for entropy).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues. Each a power of two,
    /// at most [`super::MAX_QUEUE_SIZE`].
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers (include [`super::features::VERSION_1`]).
    fn features(&self) -> u64;

    /// Size in bytes of the device-specific configuration space.
    fn config_size(&self) -> usize {
        0
    }

    /// Reads device configuration at `offset`. The transport has checked that
    /// `offset + data.len() <= config_size()`.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Writes device configuration at `offset` (within `config_size()`). Most fields are
    /// read-only; ignore what the device does not accept.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts the device with the `features` the driver accepted, on `queues` (one per entry of
    /// [`VirtioDevice::queue_max_sizes`] the driver enabled, in index order).
    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        features: u64,
        queues: Vec<ActivatedQueue>,
        interrupt: DeviceInterrupt,
    ) -> Result<(), ActivateError>;

    /// Stops the device (joining its thread: no guest memory access after this returns) and
    /// returns it to its pre-activation state, ready for another [`VirtioDevice::activate`].
    fn reset(&mut self);
}
