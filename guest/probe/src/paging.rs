//! Identity page tables, 2 MiB pages only (1 GiB pages break on this host).
//!
//! The first 64 GiB are mapped by tables assembled into `.data` (zero emulated instructions
//! at boot). All entries have the USER bit so ring-3 code (`user.rs`) can run from the image;
//! SMEP/SMAP stay off. Addresses in 64..512 GiB are reached through a one-entry "window"
//! (`ensure_mapped`).

use core::sync::atomic::{AtomicU64, Ordering};

/// Bytes identity-mapped by the boot page tables.
pub const MAPPED_LIMIT: u64 = 64 << 30;
const PAGE_2M: u64 = 2 << 20;
const FLAGS_TABLE: u64 = 0x7; // present | writable | user
const FLAGS_LEAF: u64 = 0x87; // present | writable | user | 2 MiB

core::arch::global_asm!(
    r#"
    .pushsection .data.page_tables, "aw"
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
    .globl boot_pdpt
boot_pdpt:
    .set pdpt_i, 0
    .rept 64
    .quad boot_pd + pdpt_i * 4096 + 0x7
    .set pdpt_i, pdpt_i + 1
    .endr
    .fill 448, 8, 0
    .globl window_pd
window_pd:
    .fill 512, 8, 0
boot_pd:
    .set pd_i, 0
    .rept 32768
    .quad (pd_i << 21) + 0x87
    .set pd_i, pd_i + 1
    .endr
    .popsection
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static mut boot_pdpt: [u64; 512];
    static mut window_pd: [u64; 512];
}

/// Currently windowed 2 MiB frame (0 = none).
static WINDOW: AtomicU64 = AtomicU64::new(0);

/// Makes `addr` accessible through the identity map. Below `MAPPED_LIMIT` this is a no-op; up
/// to 512 GiB the 2 MiB frame holding `addr` is mapped through the window, replacing the
/// previous window (so only one high frame is accessible at a time). BSP only.
pub fn ensure_mapped(addr: u64) -> Result<(), &'static str> {
    if addr < MAPPED_LIMIT {
        return Ok(());
    }
    if addr >= 512 << 30 {
        return Err("address above 512 GiB");
    }
    let frame = addr & !(PAGE_2M - 1);
    let old = WINDOW.swap(frame, Ordering::Relaxed);
    if old == frame {
        return Ok(());
    }
    // SAFETY: only the BSP changes the window, with interrupts off; the window PDPT slots
    // (64..512) and window_pd are used for nothing else. CR3 reload flushes the TLB.
    unsafe {
        let pdpt = &raw mut boot_pdpt;
        let pd = &raw mut window_pd;
        if old != 0 {
            (*pdpt)[(old >> 30) as usize] = 0;
            (*pd)[((old >> 21) & 511) as usize] = 0;
        }
        (*pd)[((frame >> 21) & 511) as usize] = frame | FLAGS_LEAF;
        (*pdpt)[(frame >> 30) as usize] = (pd as u64) | FLAGS_TABLE;
        let (cr3, flags) = x86_64::registers::control::Cr3::read_raw();
        x86_64::registers::control::Cr3::write_raw(cr3, flags);
    }
    Ok(())
}
