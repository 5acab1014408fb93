//! Serialising `acpi_tables` objects and fixing up the one header field that
//! crate cannot set for us (see `madt.rs`).

use acpi_tables::Aml;

/// Offset of the checksum byte in the standard 36-byte SDT header.
pub(crate) const SDT_CHECKSUM_OFFSET: usize = 9;

/// Serialises any `acpi_tables` object into a fresh buffer.
pub(crate) fn to_vec(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Wrapping byte sum; a valid ACPI table (or RSDP part) sums to 0.
pub(crate) fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Recomputes the SDT header checksum after the table bytes were patched.
pub(crate) fn fix_sdt_checksum(table: &mut [u8]) {
    table[SDT_CHECKSUM_OFFSET] = 0;
    table[SDT_CHECKSUM_OFFSET] = 0u8.wrapping_sub(sum(table));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_checksum_sums_to_zero() {
        let mut table: Vec<u8> = (0..=200u8).collect();
        assert_ne!(sum(&table), 0);
        fix_sdt_checksum(&mut table);
        assert_eq!(sum(&table), 0);
    }
}
