//! The local APIC and the IOAPIC as the interrupt-driven checks (`intx`, `idle`) program them.

use crate::cpu::KERNEL_CS;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use x86_64::VirtAddr;
use x86_64::registers::model_specific::Msr;
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::gdt::SegmentSelector;
use x86_64::structures::idt::InterruptDescriptorTable;

/// A redirection entry with the mask bit set (nothing else).
pub const RTE_MASKED: u32 = 1 << 16;
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_SVR: u64 = 0xf0;
const APIC_ICR_LO: u64 = 0x300;
/// ICR destination shorthand "self" (fixed delivery, edge).
const ICR_SELF: u32 = 1 << 18;
/// The `stray-irq` check's vector: one no check installs a handler for.
const STRAY_VECTOR: u32 = 0x60;

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
        self.pins([gsi])[0]
    }
    /// [`pin`](Self::pin) for several GSIs, reading the IOAPIC's size once.
    pub fn pins<const N: usize>(&self, gsis: [u32; N]) -> [Option<u32>; N] {
        let entries = ((self.read(1) >> 16) & 0xff) + 1;
        gsis.map(|gsi| gsi.checked_sub(self.gsi_base).filter(|&p| p < entries))
    }
    /// Points input `pin` at `dest`'s local APIC with the low dword `low` (vector, trigger,
    /// polarity), masked while the halves are written.
    pub fn route(&self, pin: u32, low: u32, dest: u32) {
        self.write(0x10 + 2 * pin, RTE_MASKED);
        self.write(0x11 + 2 * pin, dest << 24);
        self.write(0x10 + 2 * pin, low);
    }
}

/// MADT layout: the SDT header, local APIC address and flags, then entries (type, length, ...).
const MADT_ENTRIES: usize = 44;
const MADT_IO_APIC: u8 = 1;
const MADT_IO_APIC_LEN: usize = 12;

/// The first IOAPIC the MADT lists (found the lean way, see `sdt.rs`, and in ring 3: the
/// table walk is pure computation, see `user::call`).
pub fn io_apic(rsdp: u64) -> Result<IoApic, String> {
    crate::user::call(|| find_io_apic(rsdp))
}

fn find_io_apic(rsdp: u64) -> Result<IoApic, String> {
    let madt = crate::sdt::find(rsdp, b"APIC")?;
    let mut rest = madt.get(MADT_ENTRIES..).unwrap_or_default();
    while let [kind, len, ..] = *rest {
        let len = usize::from(len);
        let Some(entry) = rest.get(..len).filter(|_| len >= 2) else {
            return Err(format!("MADT entry of type {kind} has bad length {len}"));
        };
        if kind == MADT_IO_APIC && len >= MADT_IO_APIC_LEN {
            let field = |off: usize| {
                entry
                    .get(off..off + 4)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u32::from_le_bytes)
            };
            return Ok(IoApic {
                regs: Mmio(u64::from(field(4))),
                gsi_base: field(8),
            });
        }
        rest = &rest[len..];
    }
    Err("no IOAPIC in the MADT".into())
}

/// The `stray-irq` check: sends this CPU an interrupt on a vector without a handler, which the
/// #NP handler (`cpu.rs`) must report as `PROBE unexpected interrupt vector=96 (0x60)` before it
/// halts. Returns only if the interrupt never arrives.
pub fn stray_irq_check() -> Result<String, String> {
    // SAFETY: reading IA32_APIC_BASE has no side effects.
    let lapic = Mmio(unsafe { Msr::new(IA32_APIC_BASE).read() } & 0xf_ffff_f000);
    lapic.write(APIC_SVR, lapic.read(APIC_SVR) | 0x1ff); // software-enable, spurious 0xff
    lapic.write(APIC_ICR_LO, ICR_SELF | STRAY_VECTOR);
    // SAFETY: the interrupt is meant to fault (#NP); the handler reports and halts.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    Err(format!("no interrupt on vector {STRAY_VECTOR:#x} arrived"))
}

/// Loads a copy of the probe's IDT with `handlers` (vector, entry point) added, each on IST1;
/// returns the table that was loaded before, for a check that puts it back. The copy is built
/// in ring 3 (`user::call`): only `sidt` and `lidt` run in ring 0.
///
/// # Safety
/// Each entry point must be an interrupt handler that preserves every register and ends in
/// `iretq` (a stub from `global_asm!`).
pub unsafe fn install_handlers(handlers: &[(u8, u64)]) -> Result<DescriptorTablePointer, String> {
    let old = x86_64::instructions::tables::sidt();
    if usize::from(old.limit) + 1 != core::mem::size_of::<InterruptDescriptorTable>() {
        return Err(format!("loaded IDT has limit {:#x}", old.limit));
    }
    // SAFETY: `old` describes a full 256-entry table (checked above); the caller vouches for
    // the entry points.
    let idt = crate::user::call(|| unsafe { idt_with(old.base.as_ptr(), handlers) });
    idt.load();
    Ok(old)
}

/// A new IDT: a copy of the one at `base` with `handlers` added.
///
/// # Safety
/// `base` must point to a full 256-entry IDT; the handlers must be as for
/// [`install_handlers`].
unsafe fn idt_with(
    base: *const InterruptDescriptorTable,
    handlers: &[(u8, u64)],
) -> &'static mut InterruptDescriptorTable {
    let mut idt = Box::<InterruptDescriptorTable>::new_uninit();
    // SAFETY: the table at `base` is a full IDT (the caller's promise); it is copied straight
    // into the new allocation, which does not overlap it, not changed.
    let idt: &'static mut InterruptDescriptorTable = unsafe {
        core::ptr::copy_nonoverlapping(base, idt.as_mut_ptr(), 1);
        Box::leak(idt.assume_init())
    };
    for &(vector, handler) in handlers {
        // SAFETY: the caller vouches for the entry points; IST index 0 (IST1) is set up in
        // cpu.rs. The selector is named: `set_handler_addr` takes the running CS, which in
        // ring 3 is the user one.
        unsafe {
            idt[vector]
                .set_handler_addr(VirtAddr::new(handler))
                .set_code_selector(SegmentSelector(KERNEL_CS))
                .set_stack_index(0);
        }
    }
    idt
}
