//! The local APIC and the IOAPIC as the interrupt-driven checks (`intx`, `idle`) program them.

use ::acpi::madt::{Madt, MadtEntry};
use alloc::format;
use alloc::string::String;

/// A redirection entry with the mask bit set (nothing else).
pub const RTE_MASKED: u32 = 1 << 16;

/// 32-bit registers at an identity-mapped MMIO base.
pub struct Mmio(pub u64);

impl Mmio {
    pub fn read(&self, reg: u64) -> u32 {
        // SAFETY: APIC registers are identity-mapped MMIO (below the 64 GiB map); 32-bit access.
        unsafe { ((self.0 + reg) as *const u32).read_volatile() }
    }
    pub fn write(&self, reg: u64, v: u32) {
        // SAFETY: as for `read`; callers write architecturally defined values.
        unsafe { ((self.0 + reg) as *mut u32).write_volatile(v) }
    }
}

pub struct IoApic {
    pub regs: Mmio,
    pub gsi_base: u32,
}

impl IoApic {
    pub fn read(&self, index: u32) -> u32 {
        self.regs.write(0x00, index);
        self.regs.read(0x10)
    }
    pub fn write(&self, index: u32, v: u32) {
        self.regs.write(0x00, index);
        self.regs.write(0x10, v);
    }
    /// The redirection entry index of `gsi`, if this IOAPIC has that input.
    pub fn pin(&self, gsi: u32) -> Option<u32> {
        let entries = ((self.read(1) >> 16) & 0xff) + 1;
        gsi.checked_sub(self.gsi_base).filter(|&p| p < entries)
    }
    /// Points input `pin` at `dest`'s local APIC with the low dword `low` (vector, trigger,
    /// polarity), masked while the halves are written.
    pub fn route(&self, pin: u32, low: u32, dest: u32) {
        self.write(0x10 + 2 * pin, RTE_MASKED);
        self.write(0x11 + 2 * pin, dest << 24);
        self.write(0x10 + 2 * pin, low);
    }
}

/// The first IOAPIC the MADT lists.
pub fn io_apic(rsdp: u64) -> Result<IoApic, String> {
    let tables = crate::acpi::tables(rsdp)?;
    let madt = tables
        .find_table::<Madt>()
        .map_err(|e| format!("no MADT: {e:?}"))?;
    for entry in madt.get().entries() {
        if let MadtEntry::IoApic(e) = entry {
            let (addr, base) = (e.io_apic_address, e.global_system_interrupt_base);
            return Ok(IoApic {
                regs: Mmio(u64::from(addr)),
                gsi_base: base,
            });
        }
    }
    Err("no IOAPIC in the MADT".into())
}
