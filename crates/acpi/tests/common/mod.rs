//! Minimal, independent readers for the ACPI structures under test: offsets
//! come from the ACPI 6.5 spec, not from `acpi_tables`.
#![allow(dead_code)]

use hyperpool_acpi::AcpiConfig;

pub fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A Generic Address Structure, decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub bit_offset: u8,
    pub access_size: u8,
    pub address: u64,
}

pub fn gas_at(b: &[u8], off: usize) -> Gas {
    Gas {
        space: b[off],
        bit_width: b[off + 1],
        bit_offset: b[off + 2],
        access_size: b[off + 3],
        address: u64_at(b, off + 4),
    }
}

/// One byte-wide I/O register at `port`.
pub fn io_byte(port: u16) -> Gas {
    Gas {
        space: 1,
        bit_width: 8,
        bit_offset: 0,
        access_size: 1,
        address: port.into(),
    }
}

/// `(type, bytes)` of every MADT interrupt controller structure.
pub fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let (ty, len) = (madt[off], madt[off + 1] as usize);
        assert!(len >= 2, "zero-length MADT entry at {off}");
        out.push((ty, &madt[off..off + len]));
        off += len;
    }
    assert_eq!(off, madt.len(), "MADT entries overrun the table");
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn cfg(cpus: u32) -> AcpiConfig {
    AcpiConfig {
        cpus,
        ..AcpiConfig::default()
    }
}
