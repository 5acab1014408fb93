//! MCFG: where the PCIe ECAM window is, so guests use memory-mapped configuration.

use acpi_tables::mcfg::MCFG;

use crate::bytes::to_vec;
use crate::{OEM_ID, OEM_REVISION, OEM_TABLE_ID, PciConfig};

/// Header, 8 reserved bytes, one 16-byte allocation entry.
pub(crate) const LEN: usize = 36 + 8 + 16;

pub(crate) fn build(pci: &PciConfig) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, 0, 0, pci.bus_end);
    to_vec(&mcfg)
}
