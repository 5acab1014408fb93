//! Scratch RAM for the I/O benchmarks: megabytes of rings and buffers taken from the PVH memory
//! map at run time rather than from the image, so the image (and every other check's footprint)
//! stays small.
//!
//! The arena is the first 2 MiB-aligned stretch of RAM above the image that avoids everything
//! `mem::reserved` lists (the VMM's start_info, memory map, command line, ACPI tables). It is
//! identity mapped with the USER bit like all memory, so ring-3 loops use it directly.

use crate::mem;
use crate::paging;
use crate::pvh::{E820_RAM, StartInfo};
use alloc::format;
use alloc::string::String;

const ALIGN: u64 = 2 << 20;

/// Physical (= virtual) address of `bytes` bytes of free RAM, 2 MiB aligned.
pub fn take(si: &StartInfo, si_paddr: u64, bytes: u64) -> Result<u64, String> {
    unsafe extern "C" {
        static __image_end: u8;
    }
    let image_end = &raw const __image_end as u64;
    let reserved = mem::reserved(si, si_paddr);
    let clashes = |start: u64, end: u64| reserved.iter().any(|&(s, e)| start < e && end > s);
    for e in si.memmap().filter(|e| e.kind == E820_RAM) {
        let region_end = e.addr.saturating_add(e.size).min(paging::MAPPED_LIMIT);
        let mut start = e.addr.max(image_end).next_multiple_of(ALIGN);
        while start.saturating_add(bytes) <= region_end {
            if !clashes(start, start + bytes) {
                return Ok(start);
            }
            start += ALIGN;
        }
    }
    Err(format!(
        "no {} MiB of free RAM above the image for the benchmark (give the VM more memory)",
        bytes >> 20
    ))
}
