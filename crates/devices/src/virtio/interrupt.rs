//! How a virtio device tells its driver something: a used buffer, a config change, or that it
//! needs a reset.
//!
//! The device holds a [`DeviceInterrupt`]; it sets the ISR bit and calls the transport's
//! [`VirtioInterrupt`] sink with the MSI-X vector the driver chose for that queue (or for config
//! changes). The sink — implemented by the PCI side — decides how that reaches the guest: an
//! MSI-X message (irqfd) when MSI-X is enabled (nothing for [`NO_VECTOR`]), else the function's
//! level-triggered INTx pin, which follows the ISR: up while it is non-zero, down once the
//! driver's read cleared it (see [`crate::pci::intx`]).

use std::fmt::Display;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};

use super::NO_VECTOR;
use crate::pci::IntxLevel;

/// Where a virtio transport delivers interrupts. Implemented by the PCI side (MSI-X / INTx).
pub trait VirtioInterrupt: Send + Sync {
    /// Delivers `vector`, the MSI-X vector the driver configured for the source.
    ///
    /// With MSI-X enabled: signal that table entry (honouring its mask), or nothing for
    /// [`NO_VECTOR`]. With MSI-X disabled the vector is left pending (no INTx yet).
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

/// The ISR status register (virtio 1.2 §4.1.4.5): bit 0 a used buffer, bit 1 a config change.
/// Reading it through the transport clears it (and is the driver's INTx acknowledgement).
/// Clones share the register: the PCI side's INTx pin holds one to follow it.
#[derive(Debug, Default, Clone)]
pub struct IsrStatus(Arc<AtomicU8>);

impl IsrStatus {
    pub const QUEUE: u8 = 1 << 0;
    pub const CONFIG: u8 = 1 << 1;

    pub fn set(&self, bits: u8) {
        self.0.fetch_or(bits, Ordering::SeqCst);
    }

    /// The value without clearing it (for an INTx resample: is the line still pending?).
    pub fn peek(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }

    /// The guest's read: returns the bits and clears them atomically.
    pub fn read_and_clear(&self) -> u8 {
        self.0.swap(0, Ordering::SeqCst)
    }
}

/// The INTx line of a virtio function is up while the ISR is non-zero (virtio 1.2 §4.1.5.3).
impl IntxLevel for IsrStatus {
    fn asserted(&self) -> bool {
        self.peek() != 0
    }
}

/// State shared between a transport and the device it carries.
pub(crate) struct InterruptState {
    pub(crate) isr: IsrStatus,
    config_vector: AtomicU16,
    queue_vectors: Box<[AtomicU16]>,
    needs_reset: AtomicBool,
    config_generation: AtomicU8,
    sink: Arc<dyn VirtioInterrupt>,
    name: String,
}

/// A device's handle for signalling its driver. Cheap to clone; safe to use from device threads.
#[derive(Clone)]
pub struct DeviceInterrupt {
    state: Arc<InterruptState>,
}

impl DeviceInterrupt {
    #[cfg(test)]
    pub(crate) fn new(name: &str, num_queues: usize, sink: Arc<dyn VirtioInterrupt>) -> Self {
        Self::with_isr(name, num_queues, sink, IsrStatus::default())
    }

    /// A handle whose ISR register is `isr` (shared with the PCI side's INTx pin).
    pub(crate) fn with_isr(
        name: &str,
        num_queues: usize,
        sink: Arc<dyn VirtioInterrupt>,
        isr: IsrStatus,
    ) -> Self {
        Self {
            state: Arc::new(InterruptState {
                isr,
                config_vector: AtomicU16::new(NO_VECTOR),
                queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
                needs_reset: AtomicBool::new(false),
                config_generation: AtomicU8::new(0),
                sink,
                name: name.to_owned(),
            }),
        }
    }

    /// Tells the driver that queue `queue` has new used buffers.
    pub fn signal_queue(&self, queue: usize) -> io::Result<()> {
        self.state.isr.set(IsrStatus::QUEUE);
        let vector = self
            .state
            .queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.state.sink.trigger(vector)
    }

    /// Tells the driver that the device configuration (or status) changed.
    pub fn signal_config(&self) -> io::Result<()> {
        self.state.config_generation.fetch_add(1, Ordering::SeqCst);
        self.state.isr.set(IsrStatus::CONFIG);
        self.state
            .sink
            .trigger(self.state.config_vector.load(Ordering::SeqCst))
    }

    /// Marks the device broken (`DEVICE_NEEDS_RESET`) because of what the guest did; logs the
    /// first time only, and notifies the driver through a config change as the spec asks.
    pub fn set_needs_reset(&self, why: &dyn Display) {
        if !self.state.needs_reset.swap(true, Ordering::SeqCst) {
            tracing::warn!("virtio {}: needs reset: {why}", self.state.name);
            if let Err(e) = self.signal_config() {
                tracing::warn!("virtio {}: config interrupt: {e}", self.state.name);
            }
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.state.needs_reset.load(Ordering::SeqCst)
    }

    pub(crate) fn isr(&self) -> &IsrStatus {
        &self.state.isr
    }

    pub(crate) fn clear_needs_reset(&self) {
        self.state.needs_reset.store(false, Ordering::SeqCst);
    }

    pub(crate) fn config_generation(&self) -> u8 {
        self.state.config_generation.load(Ordering::SeqCst)
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.state.config_vector.load(Ordering::SeqCst)
    }

    pub(crate) fn set_config_vector(&self, vector: u16) {
        self.state.config_vector.store(vector, Ordering::SeqCst);
    }

    pub(crate) fn queue_vector(&self, queue: usize) -> u16 {
        self.state
            .queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    pub(crate) fn set_queue_vector(&self, queue: usize, vector: u16) {
        if let Some(v) = self.state.queue_vectors.get(queue) {
            v.store(vector, Ordering::SeqCst);
        }
    }

    /// Back to power-on state: no vectors, nothing pending, not broken.
    pub(crate) fn reset(&self) {
        self.state.isr.read_and_clear();
        self.clear_needs_reset();
        self.set_config_vector(NO_VECTOR);
        for v in self.state.queue_vectors.iter() {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<u16>>);
    impl VirtioInterrupt for Recorder {
        fn trigger(&self, vector: u16) -> io::Result<()> {
            self.0.lock().unwrap().push(vector);
            Ok(())
        }
    }

    #[test]
    fn isr_is_read_to_clear_and_vectors_route() {
        let rec = Arc::new(Recorder::default());
        let irq = DeviceInterrupt::new("test", 2, rec.clone());
        irq.set_queue_vector(1, 3);
        irq.set_config_vector(7);
        irq.signal_queue(1).unwrap();
        irq.signal_queue(0).unwrap();
        irq.signal_queue(99).unwrap(); // unknown queue: NO_VECTOR, no panic
        assert_eq!(irq.isr().peek(), IsrStatus::QUEUE);
        irq.signal_config().unwrap();
        assert_eq!(
            irq.isr().read_and_clear(),
            IsrStatus::QUEUE | IsrStatus::CONFIG
        );
        assert_eq!(irq.isr().read_and_clear(), 0);
        assert_eq!(*rec.0.lock().unwrap(), vec![3, NO_VECTOR, NO_VECTOR, 7]);
    }

    #[test]
    fn needs_reset_signals_config_once() {
        let rec = Arc::new(Recorder::default());
        let irq = DeviceInterrupt::new("test", 1, rec.clone());
        irq.set_config_vector(2);
        irq.set_needs_reset(&"first");
        irq.set_needs_reset(&"second");
        assert!(irq.needs_reset());
        assert_eq!(*rec.0.lock().unwrap(), vec![2]);
        irq.reset();
        assert!(!irq.needs_reset());
        assert_eq!(irq.config_vector(), NO_VECTOR);
    }
}
