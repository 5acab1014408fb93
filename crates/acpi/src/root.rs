//! RSDP and XSDT, straight from `acpi_tables`.

use acpi_tables::{rsdp::Rsdp, xsdt::XSDT};

use crate::bytes::to_vec;
use crate::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Length of the ACPI 2.0+ RSDP.
pub(crate) const RSDP_LEN: usize = 36;
const SDT_HEADER_LEN: usize = 36;

pub(crate) fn xsdt_len(entries: usize) -> usize {
    SDT_HEADER_LEN + entries * 8
}

/// Revision 2 RSDP pointing at the XSDT (the 32-bit RSDT pointer stays 0).
pub(crate) fn build_rsdp(xsdt_addr: u64) -> Vec<u8> {
    to_vec(&Rsdp::new(OEM_ID, xsdt_addr))
}

pub(crate) fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &addr in entries {
        xsdt.add_entry(addr);
    }
    to_vec(&xsdt)
}
