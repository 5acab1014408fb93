//! The guest's physical memory map as every boot protocol reports it.

use super::layout::{ACPI_END, EBDA_START, HIMEM_START, ram_ranges};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    fn new(addr: u64, size: u64, kind: E820Kind) -> Self {
        Self { addr, size, kind }
    }
}

/// The map for a guest of `mem_size` bytes: low RAM, the reserved EBDA/BIOS window (which holds
/// the ACPI tables), RAM from 1 MiB to the hole, and RAM above 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry::new(0, EBDA_START, E820Kind::Ram),
        E820Entry::new(EBDA_START, ACPI_END - EBDA_START, E820Kind::Reserved),
    ];
    for (start, len) in ram_ranges(mem_size) {
        let (start, len) = if start == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START))
        } else {
            (start, len)
        };
        if len > 0 {
            map.push(E820Entry::new(start, len, E820Kind::Ram));
        }
    }
    map
}

/// Total RAM the map reports.
pub fn ram_bytes(map: &[E820Entry]) -> u64 {
    map.iter()
        .filter(|e| e.kind == E820Kind::Ram)
        .map(|e| e.size)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO32_START, RAM_64BIT_START};

    #[test]
    fn small_guest_has_low_ram_bios_hole_and_high_ram() {
        let map = memory_map(128 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry::new(0, 0x9fc00, E820Kind::Ram),
                E820Entry::new(0x9fc00, 0x60400, E820Kind::Reserved),
                E820Entry::new(0x100000, (128 << 20) - 0x100000, E820Kind::Ram),
            ]
        );
        assert_eq!(ram_bytes(&map), (128 << 20) - 0x100000 + 0x9fc00);
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let map = memory_map(6 << 30);
        let high = map.last().unwrap();
        assert_eq!(high.addr, RAM_64BIT_START);
        assert_eq!(high.size, (6u64 << 30) - MMIO32_START);
        let below = map[2];
        assert_eq!(below.addr + below.size, MMIO32_START);
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= MMIO32_START || e.addr >= 1 << 32)
        );
    }
}
