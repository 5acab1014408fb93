//! The `mem` check: for each RAM region of the PVH memory map, write and read back a
//! pattern on its first and last 4 KiB page (original contents restored afterwards).

use crate::paging;
use crate::pvh::{E820_RAM, StartInfo};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

const PAGE: u64 = 4096;

/// Ranges never touched: VMM data (start_info/memmap, cmdline, ACPI) plus our own image
/// and the AP trampoline, and whatever start_info points at.
pub fn reserved(si: &StartInfo, start_info_paddr: u64) -> Vec<(u64, u64)> {
    unsafe extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }
    let image = (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    );
    let memmap_len = si.memmap_entries as u64 * 24;
    let mut r = alloc::vec![
        (0, 0x7000),
        (0x7000, 0x20000), // AP trampoline and scratch area
        (0x20000, 0x30000),
        (0xE0000, 0x100000),
        image,
        (start_info_paddr, start_info_paddr + 64),
        (si.memmap_paddr, si.memmap_paddr + memmap_len),
        (si.cmdline_paddr, si.cmdline_paddr + 0x1000),
        (si.rsdp_paddr, si.rsdp_paddr + 64),
    ];
    r.retain(|&(s, e)| e > s);
    r
}

pub fn overlaps(page: u64, reserved: &[(u64, u64)]) -> bool {
    reserved.iter().any(|&(s, e)| page < e && page + PAGE > s)
}

/// Pattern test of one page; contents are restored. Returns the first bad address.
fn test_page(page: u64) -> Result<(), u64> {
    paging::ensure_mapped(page).map_err(|_| page)?;
    let p = page as *mut u64;
    for i in 0..(PAGE / 8) as usize {
        // SAFETY: `page` is RAM from the memory map, identity mapped (ensure_mapped), not in
        // use by us or the VMM (reserved ranges skipped), and the AP(s) are parked.
        unsafe {
            let q = p.add(i);
            let old = q.read_volatile();
            let pattern = (q as u64) ^ 0xA5A5_5A5A_C3C3_3C3C;
            q.write_volatile(pattern);
            let back = q.read_volatile();
            q.write_volatile(old);
            if back != pattern {
                return Err(q as u64);
            }
        }
    }
    Ok(())
}

pub fn check(si: &StartInfo, start_info_paddr: u64) -> Result<String, String> {
    let reserved = reserved(si, start_info_paddr);
    let mut total = 0u64;
    let mut list: Vec<String> = Vec::new();
    for e in si.memmap().filter(|e| e.kind == E820_RAM && e.size > 0) {
        let end = e.addr + e.size;
        total += e.size;
        list.push(format!("{:#x}-{:#x}", e.addr, end));
        let first = e.addr.next_multiple_of(PAGE);
        let last = (end & !(PAGE - 1)).saturating_sub(PAGE);
        let mut pages = alloc::vec![first];
        if last > first {
            pages.push(last);
        }
        for page in pages {
            if page + PAGE > end || overlaps(page, &reserved) {
                continue;
            }
            test_page(page).map_err(|bad| format!("pattern mismatch at {bad:#x}"))?;
        }
    }
    if list.is_empty() {
        return Err(format!(
            "no RAM in PVH memmap (version={}, entries={})",
            si.version, si.memmap_entries
        ));
    }
    Ok(format!(
        "total={}M regions={} {}",
        total >> 20,
        list.len(),
        list.join(",")
    ))
}
