//! Device models the VMM attaches to a guest's I/O and MMIO buses.
//!
//! Devices never call up into the VMM: they raise interrupts through [`irq::IrqLine`]s and ask for
//! a VM-level action (poweroff, reset, debug exit) through the [`exit::ExitSignal`] they were given.

pub mod bus;
pub mod exit;
pub mod irq;
pub mod legacy;
pub mod pci;
pub mod vhost_user;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};
pub use exit::{ExitRequest, ExitSignal};
pub use irq::IrqLine;
