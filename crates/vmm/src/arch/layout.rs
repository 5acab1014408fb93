//! Guest physical address map. Everything below 1 MiB is tiny boot structures; the kernel loads at
//! 1 MiB; RAM stops at the 32-bit MMIO hole and continues at 4 GiB.

/// GDT used by every boot mode (null, code64, code32, data, tss): see [`super::gdt`].
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT for the Linux 64-bit entry (the kernel installs its own before enabling IRQs).
pub const BOOT_IDT_START: u64 = 0x540;
/// Multiboot v1 information structure, its memory map and module list.
pub const MULTIBOOT_INFO_START: u64 = 0x1000;
pub const MULTIBOOT_MODS_START: u64 = 0x1100;
pub const MULTIBOOT_MMAP_START: u64 = 0x1200;
/// PVH `hvm_start_info`, its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x7000 - 0x6100) / 24;
/// Linux `struct boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack for the Linux 64-bit entry, growing down below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the Linux 64-bit entry: PML4, PDPT, then 4 PDs of 2 MiB pages (4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Extended BIOS data area and the legacy VGA/BIOS window: reserved in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first) in the reserved BIOS area, where legacy guests also search for it.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Kernels load here (bzImage protected-mode part, PVH/ELF images link here too).
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO hole: [3 GiB, 4 GiB). PCI windows and the APICs live here.
pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_END: u64 = 1 << 32;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// PCI: 32-bit BARs in [3 GiB, 3.5 GiB); ECAM for bus 0 only (1 MiB; MCFG and `_CRS` say buses
/// 0..=0) right after; the APICs and KVM's pages above stay out of both.
pub const PCI_MMIO32_START: u64 = MMIO32_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// 64-bit BARs: 64 GiB from the first 1 GiB boundary at or above max(4 GiB, end of RAM). Needs
/// guest physical address bits to cover it (39 bits do up to 448 GiB of RAM).
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// Pins of the I/O APIC (GSIs 0..24); MSI vectors get GSIs from here up.
pub const IOAPIC_PINS: u32 = 24;
/// KVM wants three pages for the real-mode TSS and one for the EPT identity map, inside the hole.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// Where RAM continues above the hole.
pub const RAM_64BIT_START: u64 = 1 << 32;
/// Smallest guest we accept: room for the boot structures, a kernel and its early allocations.
pub const MIN_MEMORY: u64 = 16 << 20;

/// I/O ports of the platform devices.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const RTC_IRQ: u8 = 8;
/// The power button's Generic Event Device: its event register and its (ISA, edge) interrupt.
/// Between the PCI ECAM and the IOAPIC, outside every PCI window.
pub const GED_START: u64 = 0xfeb0_0000;
pub const GED_IRQ: u32 = 5;
/// The PCI hotplug controller's registers (the DSDT's `PHPR`), next to the GED.
pub const PCI_HOTPLUG_START: u64 = 0xfeb0_1000;

// The Linux entry's stack lies between the zero page and the page tables, which end before the
// command line.
const _: () = assert!(PD_START + 4 * 0x1000 <= CMDLINE_START);
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);

/// The guest RAM ranges `(start, len)` for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO32_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((RAM_64BIT_START, size - low));
    }
    ranges
}

/// Start of the 64-bit PCI window for a guest of `size` bytes of RAM.
pub fn pci_mmio64_start(size: u64) -> u64 {
    let ram_end = ram_ranges(size)
        .iter()
        .map(|(start, len)| start + len)
        .max()
        .unwrap_or(0);
    ram_end
        .max(RAM_64BIT_START)
        .next_multiple_of(PCI_MMIO64_ALIGN)
}

// The PCI areas sit inside the 32-bit hole, below the I/O APIC.
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, 3 << 30), (RAM_64BIT_START, 1 << 30)]
        );
    }

    #[test]
    fn pci_64bit_window_starts_above_ram() {
        assert_eq!(pci_mmio64_start(1 << 30), 4 << 30);
        assert_eq!(pci_mmio64_start(4 << 30), 5 << 30);
        assert_eq!(pci_mmio64_start((4 << 30) + 1), 6 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, BOOT_GDT_START + 5 * 8),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (MULTIBOOT_INFO_START, MULTIBOOT_MODS_START),
            (MULTIBOOT_MODS_START, MULTIBOOT_MMAP_START),
            (MULTIBOOT_MMAP_START, 0x2000),
            (PVH_INFO_START, PVH_MODLIST_START),
            (PVH_MODLIST_START, PVH_MEMMAP_START),
            (PVH_MEMMAP_START, ZERO_PAGE_START),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (PML4_START, PD_START + 4 * 0x1000),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:#x?} overlaps {:#x?}", w[0], w[1]);
        }
    }
}
