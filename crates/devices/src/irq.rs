//! An edge-triggered interrupt line backed by an eventfd that KVM delivers as a GSI (irqfd).

use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// One guest interrupt line. Cloning shares the same eventfd.
#[derive(Clone)]
pub struct IrqLine {
    evt: Arc<EventFd>,
    gsi: u32,
}

impl IrqLine {
    pub fn new(gsi: u32) -> std::io::Result<Self> {
        Ok(Self {
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            gsi,
        })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd to register with KVM as an irqfd for [`IrqLine::gsi`].
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises the interrupt once.
    pub fn raise(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_counts_on_the_eventfd() {
        let irq = IrqLine::new(4).unwrap();
        irq.raise().unwrap();
        irq.clone().raise().unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 2);
        assert_eq!(irq.gsi(), 4);
    }
}
