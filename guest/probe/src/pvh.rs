//! PVH boot ABI: `struct hvm_start_info` and its memory map.

/// `hvm_start_info.magic`.
pub const START_MAGIC: u32 = 0x336e_c578;
/// Memory map entry type for usable RAM.
pub const E820_RAM: u32 = 1;

/// `struct hvm_start_info` (Xen public/arch-x86/hvm/start_info.h).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

impl StartInfo {
    /// Reads the structure the VMM placed at `paddr` (EBX at entry).
    ///
    /// # Safety
    /// `paddr` must be identity mapped and point to a readable `hvm_start_info`.
    pub unsafe fn read(paddr: u64) -> Self {
        // SAFETY: guaranteed by the caller; the VMM gives no alignment promise.
        unsafe { core::ptr::read_unaligned(paddr as *const StartInfo) }
    }

    /// Memory map entries (version >= 1 only); empty when there is none.
    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> + '_ {
        let n = if self.version >= 1 && self.memmap_paddr != 0 {
            self.memmap_entries
        } else {
            0
        };
        (0..n as u64).map(move |i| {
            let p = self.memmap_paddr + i * core::mem::size_of::<MemmapEntry>() as u64;
            // SAFETY: the VMM promises memmap_entries entries at memmap_paddr (identity mapped).
            unsafe { core::ptr::read_unaligned(p as *const MemmapEntry) }
        })
    }
}
