//! PVH boot: the kernel's 32-bit entry from its ELF note, `hvm_start_info` in EBX.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, BootSpec, elf64, load_elf64, load_initramfs};
use crate::arch::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use crate::arch::regs::Entry;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Entry, BootError> {
    let loaded = load_elf64(mem, spec.kernel)?;
    let entry = elf64::pvh_entry(spec.kernel)
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
