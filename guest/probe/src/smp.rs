//! The `cpus` check: count enabled processors in the MADT, start every AP with
//! INIT-SIPI-SIPI through the xAPIC, and count the APs that arrive.
//!
//! The AP trampoline (real mode → long mode) is assembled into the image and copied to
//! `TRAMPOLINE` (SIPI vector 0x08). APs reuse the BSP's page tables and a GDT inside the
//! trampoline, atomically increment `APS_UP` and park in `cli; hlt`. They never touch a
//! stack, so no per-AP stacks are needed.

use crate::acpi::IdentityHandler;
use crate::time;
use acpi::AcpiTables;
use acpi::madt::{Madt, MadtEntry};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use x86_64::registers::model_specific::Msr;

/// Physical address the trampoline is copied to (free area 0x7000..0x20000).
const TRAMPOLINE: u64 = 0x8000;
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_ID: u64 = 0x20;
const APIC_SVR: u64 = 0xf0;
const APIC_ICR_LO: u64 = 0x300;
const APIC_ICR_HI: u64 = 0x310;
const ICR_INIT: u32 = 0x4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x4600; // STARTUP
const ICR_BUSY: u32 = 1 << 12;
const AP_TIMEOUT_US: u64 = 10_000_000;

/// Number of APs that reached long mode.
#[unsafe(no_mangle)]
static APS_UP: AtomicU32 = AtomicU32::new(0);

core::arch::global_asm!(
    r#"
    .pushsection .rodata.ap_trampoline, "a"
    .balign 16
    .globl ap_tramp_start
ap_tramp_start:
    .code16
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - ap_tramp_start + {tramp})
    movl %cr4, %eax
    orl $0x620, %eax                    /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x101, %eax                    /* LME | SCE */
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFF3, %eax
    orl $0x80000023, %eax               /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmpl $0x08, $(ap_long - ap_tramp_start + {tramp})
    .code64
ap_long:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %ss
    movq ${aps_up}, %rax
    lock incl (%rax)
1:  cli
    hlt
    jmp 1b
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
ap_gdt_ptr:
    .word 23
    .long ap_gdt - ap_tramp_start + {tramp}
    .globl ap_tramp_end
ap_tramp_end:
    .popsection
"#,
    tramp = const TRAMPOLINE,
    aps_up = sym APS_UP,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

struct Lapic(u64);

impl Lapic {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: xAPIC registers are identity mapped MMIO at the APIC base.
        unsafe { ((self.0 + reg) as *const u32).read_volatile() }
    }
    fn write(&self, reg: u64, v: u32) {
        // SAFETY: as for `read`; callers write architecturally defined values.
        unsafe { ((self.0 + reg) as *mut u32).write_volatile(v) }
    }
    fn ipi(&self, apic_id: u32, icr: u32) {
        while self.read(APIC_ICR_LO) & ICR_BUSY != 0 {
            core::hint::spin_loop();
        }
        self.write(APIC_ICR_HI, apic_id << 24);
        self.write(APIC_ICR_LO, icr);
    }
}

/// APIC IDs of enabled processors in the MADT.
fn madt_apic_ids(tables: &AcpiTables<IdentityHandler>) -> Result<Vec<u32>, String> {
    let madt = tables
        .find_table::<Madt>()
        .map_err(|e| format!("no MADT: {e:?}"))?;
    let mut ids = Vec::new();
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(e) if e.flags & 1 != 0 => ids.push(e.apic_id as u32),
            MadtEntry::LocalX2Apic(e) if e.flags & 1 != 0 => ids.push(e.x2apic_id),
            _ => {}
        }
    }
    Ok(ids)
}

pub fn check(rsdp: u64) -> Result<String, String> {
    let tables = crate::acpi::tables(rsdp)?;
    let ids = madt_apic_ids(&tables)?;
    let madt = ids.len();

    // SAFETY: reading IA32_APIC_BASE has no side effects.
    let base_msr = unsafe { Msr::new(IA32_APIC_BASE).read() };
    if base_msr & (1 << 11) == 0 {
        return Err(format!("madt={madt} local APIC disabled"));
    }
    if base_msr & (1 << 10) != 0 {
        return Err(format!("madt={madt} local APIC in x2APIC mode"));
    }
    let lapic = Lapic(base_msr & 0xf_ffff_f000);
    lapic.write(APIC_SVR, lapic.read(APIC_SVR) | 0x1ff); // software-enable, spurious 0xff
    let bsp = lapic.read(APIC_ID) >> 24;
    let targets: Vec<u32> = ids.iter().copied().filter(|&id| id != bsp).collect();
    if targets.iter().any(|&id| id > 0xff) {
        return Err(format!("madt={madt} APIC ID above 255 (needs x2APIC)"));
    }

    // SAFETY: TRAMPOLINE..+len lies in the free low-memory area (0x7000..0x20000),
    // identity mapped, and nothing else uses it.
    unsafe {
        let start = &raw const ap_tramp_start;
        let len = (&raw const ap_tramp_end as usize) - (start as usize);
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    APS_UP.store(0, Ordering::SeqCst);

    let sipi = ICR_STARTUP | (TRAMPOLINE >> 12) as u32;
    for &id in &targets {
        lapic.ipi(id, ICR_INIT);
    }
    time::delay_us(10_000);
    for &id in &targets {
        lapic.ipi(id, sipi);
    }
    time::delay_us(200);
    for &id in &targets {
        lapic.ipi(id, sipi); // ignored by APs that already left wait-for-SIPI
    }

    let deadline = time::rdtsc() + time::ticks_for_us(AP_TIMEOUT_US);
    while (APS_UP.load(Ordering::SeqCst) as usize) < targets.len() && time::rdtsc() < deadline {
        core::hint::spin_loop();
    }
    let up = APS_UP.load(Ordering::SeqCst) as usize + 1;
    if up == madt {
        Ok(format!("madt={madt} up={up}"))
    } else {
        Err(format!("madt={madt} up={up}"))
    }
}
