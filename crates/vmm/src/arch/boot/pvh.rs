//! PVH boot: the kernel's 32-bit entry from its ELF note, `hvm_start_info` in EBX.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, BootSpec, load_elf64, load_initramfs, pvh_entry};
use crate::arch::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use crate::arch::regs::Entry;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;

/// True when a 64-bit ELF carries a `Xen` note of type PHYS32_ENTRY in a PT_NOTE segment.
pub fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let ph = phoff as usize + i * usize::from(phentsize);
        if u32_at(ph) != Some(PT_NOTE) {
            return false;
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            return false;
        };
        let mut at = off as usize;
        let end = (off.saturating_add(size) as usize).min(elf.len());
        while at + 12 <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (u32_at(at), u32_at(at + 4), u32_at(at + 8))
            else {
                return false;
            };
            let name = elf.get(at + 12..at + 12 + namesz as usize);
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == Some(b"Xen\0".as_slice()) {
                return true;
            }
            let align = |n: u32| (n as usize).div_ceil(4) * 4;
            at += 12 + align(namesz) + align(descsz);
        }
        false
    })
}

pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Entry, BootError> {
    let loaded = load_elf64(mem, spec.kernel)?;
    let entry = pvh_entry(&loaded)
        .ok_or_else(|| BootError::Load("the PVH entry note is malformed".into()))?;

    let mut modules = Vec::new();
    if let Some(initramfs) = spec.initramfs {
        let placed = load_initramfs(mem, initramfs, loaded.kernel_end, u64::MAX, spec.memory_map)?;
        modules.push(hvm_modlist_entry {
            paddr: placed.addr,
            size: placed.size,
            ..Default::default()
        });
    }
    let memmap: Vec<hvm_memmap_table_entry> = spec
        .memory_map
        .iter()
        .take(PVH_MEMMAP_MAX_ENTRIES)
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: spec.rsdp_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| BootError::Load(e.to_string()))?;
    Ok(Entry::Protected32 {
        rip: entry,
        eax: 0,
        ebx: PVH_INFO_START as u32,
    })
}
