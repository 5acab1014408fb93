//! PCI: a PCIe root complex with one segment and bus 0 (host bridge at 00:00.0, devices at
//! slots 1..31, function 0), configuration access through ports 0xCF8/0xCFC and ECAM, BARs
//! placed in the VMM's PCI MMIO windows, MSI-X, and the INTx swizzle the DSDT's `_PRT` states.
//!
//! - [`config`]: a function's configuration space (header, BARs, capabilities, write masks);
//! - [`device`]: the [`PciDevice`] trait a function implements;
//! - [`msix`]: MSI-X capability, table, PBA and the interrupt path ([`MsixInterrupts`]);
//! - [`intx`]: the level-triggered INTx pin for drivers without MSI-X ([`IntxPin`]), and the
//!   thread that re-raises it after the guest's EOI ([`IntxResampler`]);
//! - [`segment`]: slots, BAR placement, dispatch, ioeventfds following BAR moves;
//! - [`hotplug`]: the ACPI hotplug controller's registers ([`PciHotplug`]);
//! - [`access`]: the bus devices the VMM maps (0xCF8, ECAM, the MMIO windows).

pub mod access;
pub mod config;
pub mod device;
pub mod host_bridge;
pub mod hotplug;
pub mod intx;
pub mod msix;
pub mod segment;
#[cfg(test)]
mod tests;

pub use access::{PciConfigIo, PciEcam, PciMmioWindow, SharedSegment};
pub use config::{BarKind, ConfigSpace, PciIds};
pub use device::{BarRequest, IoEventFd, IoEventRegistry, PciDevice};
pub use hotplug::PciHotplug;
pub use intx::{IntxLevel, IntxPin, IntxResampler, IntxRouting};
pub use msix::{MsiMessage, MsiRouting, Msix, MsixInterrupts, MsixLayout};
pub use segment::{PciError, PciSegment, SharedPciDevice, Window, intx_gsi};
