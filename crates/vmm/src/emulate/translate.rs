//! Guest-virtual to guest-physical translation by walking the guest's page tables from CR3, as
//! the MMU would for one access (4- and 5-level paging, 1 GiB / 2 MiB / 4 KiB pages, WP, NX,
//! SMEP, SMAP), setting the accessed and dirty bits it would set.
//!
//! The tables are guest memory: every entry is read through vm-memory, so tables that point
//! outside RAM end the walk with an error instead of touching host memory.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::kvm_sregs;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PAGE_SIZE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
/// Bits 12..51 of an entry: the next table's or the page's physical address.
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const CR4_LA57: u64 = 1 << 12;
const EFER_NXE: u64 = 1 << 11;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_AC: u64 = 1 << 18;

/// #PF error code bits.
const PF_PROTECTION: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;
const PF_FETCH: u32 = 1 << 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

/// Who makes the access: the privilege level and RFLAGS.AC (for SMAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accessor {
    pub user: bool,
    pub rflags: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkError {
    /// The CPU would raise #PF with this error code (CR2 = the address).
    PageFault { error_code: u32 },
    /// A non-canonical address: the CPU would raise #GP(0).
    NonCanonical,
    /// A page-table entry or the page itself is not guest RAM (MMIO, or garbage).
    NotRam { gpa: u64 },
    /// A paging mode this walker does not do (32-bit and PAE paging).
    Unsupported(&'static str),
}

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalkError::PageFault { error_code } => {
                write!(f, "page fault (error code {error_code:#x})")
            }
            WalkError::NonCanonical => f.write_str("non-canonical address"),
            WalkError::NotRam { gpa } => write!(f, "guest-physical {gpa:#x} is not RAM"),
            WalkError::Unsupported(what) => write!(f, "{what} is not supported"),
        }
    }
}

/// Translates `gva` for one access of the kind given; the result is the guest-physical address.
pub fn translate(
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    gva: u64,
    access: Access,
    who: Accessor,
) -> Result<u64, WalkError> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(gva);
    }
    if sregs.efer & EFER_LMA == 0 {
        return Err(WalkError::Unsupported("32-bit and PAE paging"));
    }
    let levels: u32 = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let va_bits = 12 + 9 * levels;
    let high = (gva as i64) >> (va_bits - 1);
    if high != 0 && high != -1 {
        return Err(WalkError::NonCanonical);
    }

    let fault_bits = match access {
        Access::Read => 0,
        Access::Write => PF_WRITE,
        Access::Fetch => PF_FETCH,
    } | if who.user { PF_USER } else { 0 };
    let nx_enabled = sregs.efer & EFER_NXE != 0;

    let mut table = sregs.cr3 & ADDRESS_MASK;
    let (mut writable, mut user, mut no_exec) = (true, true, false);
    let mut entries: Vec<u64> = Vec::with_capacity(levels as usize);
    let mut level = levels;
    let (leaf, page_bits) = loop {
        let shift = 12 + 9 * (level - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry_gpa = table + index * 8;
        let entry = with_entry(mem, entry_gpa, |e| e.load(Ordering::Acquire))?;
        if entry & PRESENT == 0 {
            return Err(WalkError::PageFault {
                error_code: fault_bits,
            });
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        no_exec |= nx_enabled && entry & NO_EXECUTE != 0;
        entries.push(entry_gpa);
        if level == 1 || ((level == 2 || level == 3) && entry & PAGE_SIZE != 0) {
            break (entry, shift);
        }
        table = entry & ADDRESS_MASK;
        level -= 1;
    };

    let protection = || WalkError::PageFault {
        error_code: fault_bits | PF_PROTECTION,
    };
    let supervisor_on_user_page = !who.user && user;
    match access {
        Access::Write => {
            if !writable && (who.user || sregs.cr0 & CR0_WP != 0) {
                return Err(protection());
            }
        }
        Access::Fetch => {
            if no_exec || (supervisor_on_user_page && sregs.cr4 & CR4_SMEP != 0) {
                return Err(protection());
            }
        }
        Access::Read => {}
    }
    if who.user && !user {
        return Err(protection());
    }
    if access != Access::Fetch
        && supervisor_on_user_page
        && sregs.cr4 & CR4_SMAP != 0
        && who.rflags & RFLAGS_AC == 0
    {
        return Err(protection());
    }

    for (i, &e) in entries.iter().enumerate() {
        let leaf_write = access == Access::Write && i + 1 == entries.len();
        let bits = if leaf_write {
            ACCESSED | DIRTY
        } else {
            ACCESSED
        };
        with_entry(mem, e, |e| e.fetch_or(bits, Ordering::AcqRel))?;
    }
    let page_mask = (1u64 << page_bits) - 1;
    Ok((leaf & ADDRESS_MASK & !page_mask) | (gva & page_mask))
}

/// Runs `f` on one page-table entry, as an atomic in guest memory (the guest's other vCPUs may
/// change it meanwhile).
fn with_entry<T>(
    mem: &GuestMemoryMmap,
    gpa: u64,
    f: impl FnOnce(&AtomicU64) -> T,
) -> Result<T, WalkError> {
    let not_ram = || WalkError::NotRam { gpa };
    let slice = mem.get_slice(GuestAddress(gpa), 8).map_err(|_| not_ram())?;
    let entry = slice
        .get_atomic_ref::<AtomicU64>(0)
        .map_err(|_| not_ram())?;
    Ok(f(entry))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::Bytes;

    pub const MIB: usize = 1 << 20;

    /// Long-mode sregs with paging on, CR3 at `cr3`, WP set.
    pub fn long_mode(cr3: u64) -> kvm_sregs {
        kvm_sregs {
            cr0: CR0_PG | CR0_WP | 1,
            cr3,
            cr4: 1 << 5,
            efer: EFER_LMA | (1 << 8) | EFER_NXE,
            ..Default::default()
        }
    }

    pub fn kernel() -> Accessor {
        Accessor {
            user: false,
            rflags: 2,
        }
    }

    fn put(mem: &GuestMemoryMmap, gpa: u64, v: u64) {
        mem.write_obj(v, GuestAddress(gpa)).unwrap();
    }

    /// Maps `gva` to `gpa` with a 4 KiB page: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
    pub fn map_4k(mem: &GuestMemoryMmap, gva: u64, gpa: u64, leaf_flags: u64) {
        let idx = |l: u32| (gva >> (12 + 9 * (l - 1))) & 0x1ff;
        put(mem, 0x1000 + idx(4) * 8, 0x2000 | 0x7);
        put(mem, 0x2000 + idx(3) * 8, 0x3000 | 0x7);
        put(mem, 0x3000 + idx(2) * 8, 0x4000 | 0x7);
        put(mem, 0x4000 + idx(1) * 8, gpa | leaf_flags);
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap()
    }

    #[test]
    fn four_level_4k_sets_accessed_and_dirty() {
        let mem = memory();
        let gva = 0xffff_8880_0012_3456;
        map_4k(&mem, gva, 0x80_0000, PRESENT | WRITABLE);
        let sregs = long_mode(0x1000);
        let gpa = translate(&mem, &sregs, gva, Access::Read, kernel()).unwrap();
        assert_eq!(gpa, 0x80_0456);
        let pte: u64 = mem.read_obj(GuestAddress(0x4000 + 0x123 * 8)).unwrap();
        assert_eq!(pte & (ACCESSED | DIRTY), ACCESSED);
        translate(&mem, &sregs, gva, Access::Write, kernel()).unwrap();
        let pte: u64 = mem.read_obj(GuestAddress(0x4000 + 0x123 * 8)).unwrap();
        assert_eq!(pte & (ACCESSED | DIRTY), ACCESSED | DIRTY);
    }

    #[test]
    fn large_pages_2m_and_1g() {
        let mem = memory();
        let sregs = long_mode(0x1000);
        // 2 MiB page: gva 0x4020_0000 -> 0x60_0000; the PAT bit (12) of the entry is not address.
        put(&mem, 0x1000, 0x2000 | 3);
        put(&mem, 0x2000 + 8, 0x3000 | 3);
        put(&mem, 0x3000 + 8, 0x60_0000 | (1 << 12) | PAGE_SIZE | 3);
        let gpa = translate(&mem, &sregs, 0x4020_1234, Access::Read, kernel()).unwrap();
        assert_eq!(gpa, 0x60_1234);
        // 1 GiB page at PDPT index 2: gva 0x8000_0000 + off -> 0x4000_0000 + off (need not be RAM).
        put(&mem, 0x2000 + 16, 0x4000_0000 | PAGE_SIZE | 3);
        let gpa = translate(&mem, &sregs, 0x8123_4567, Access::Read, kernel()).unwrap();
        assert_eq!(gpa, 0x4123_4567);
    }

    #[test]
    fn five_level_paging() {
        let mem = memory();
        let mut sregs = long_mode(0x5000);
        sregs.cr4 |= CR4_LA57;
        let gva: u64 = 0xff11_0000_0000_1008;
        let idx5 = (gva >> 48) & 0x1ff;
        put(&mem, 0x5000 + idx5 * 8, 0x1000 | 3);
        map_4k(&mem, gva, 0x9000, PRESENT | WRITABLE);
        assert_eq!(
            translate(&mem, &sregs, gva, Access::Write, kernel()).unwrap(),
            0x9008
        );
        // Canonical for 4-level paging is not canonical for 5-level paging, and the reverse.
        assert_eq!(
            translate(&mem, &sregs, 0x0100_0000_0000_0000, Access::Read, kernel()),
            Err(WalkError::NonCanonical)
        );
        sregs.cr4 &= !CR4_LA57;
        assert_eq!(
            translate(&mem, &sregs, gva, Access::Read, kernel()),
            Err(WalkError::NonCanonical)
        );
    }

    #[test]
    fn faults_as_the_mmu_would() {
        let mem = memory();
        let sregs = long_mode(0x1000);
        let gva = 0x40_0000;
        assert_eq!(
            translate(&mem, &sregs, gva, Access::Write, kernel()),
            Err(WalkError::PageFault {
                error_code: PF_WRITE
            })
        );
        map_4k(&mem, gva, 0x80_0000, PRESENT);
        assert_eq!(
            translate(&mem, &sregs, gva, Access::Write, kernel()),
            Err(WalkError::PageFault {
                error_code: PF_WRITE | PF_PROTECTION
            }),
            "read-only page with CR0.WP"
        );
        let mut no_wp = sregs;
        no_wp.cr0 &= !CR0_WP;
        assert!(translate(&mem, &no_wp, gva, Access::Write, kernel()).is_ok());
        map_4k(&mem, gva, 0x80_0000, PRESENT | WRITABLE | NO_EXECUTE);
        assert_eq!(
            translate(&mem, &sregs, gva, Access::Fetch, kernel()),
            Err(WalkError::PageFault {
                error_code: PF_FETCH | PF_PROTECTION
            })
        );
        // A user page (the test tables set U on every level) under SMAP, with and without AC.
        map_4k(&mem, gva, 0x80_0000, PRESENT | WRITABLE | USER);
        let mut smap = sregs;
        smap.cr4 |= CR4_SMAP;
        assert!(translate(&mem, &smap, gva, Access::Read, kernel()).is_err());
        let ac = Accessor {
            user: false,
            rflags: 2 | RFLAGS_AC,
        };
        assert!(translate(&mem, &smap, gva, Access::Read, ac).is_ok());
        // User code on a supervisor page.
        map_4k(&mem, gva, 0x80_0000, PRESENT | WRITABLE);
        let user = Accessor {
            user: true,
            rflags: 2,
        };
        assert_eq!(
            translate(&mem, &sregs, gva, Access::Read, user),
            Err(WalkError::PageFault {
                error_code: PF_USER | PF_PROTECTION
            })
        );
    }

    #[test]
    fn hostile_tables_stay_inside_guest_memory() {
        let mem = memory();
        // CR3 beyond RAM, and a PML4 entry pointing beyond RAM.
        let sregs = long_mode(0x7fff_f000);
        assert_eq!(
            translate(&mem, &sregs, 0x1000, Access::Read, kernel()),
            Err(WalkError::NotRam { gpa: 0x7fff_f000 })
        );
        put(&mem, 0x1000, 0xf_ffff_ffff_f000 | 3);
        let sregs = long_mode(0x1000);
        assert!(matches!(
            translate(&mem, &sregs, 0x1000, Access::Read, kernel()),
            Err(WalkError::NotRam { .. })
        ));
        let mut legacy = sregs;
        legacy.efer = 0;
        assert!(matches!(
            translate(&mem, &legacy, 0x1000, Access::Read, kernel()),
            Err(WalkError::Unsupported(_))
        ));
        let mut off = sregs;
        off.cr0 = 1;
        assert_eq!(
            translate(&mem, &off, 0x1234, Access::Read, kernel()),
            Ok(0x1234)
        );
    }
}
