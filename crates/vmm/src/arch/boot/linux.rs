//! Linux's 64-bit boot protocol (Documentation/arch/x86/boot.rst) for bzImage and vmlinux.

use std::io::Cursor;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::le::{u16_at, u32_at, u64_at};
use super::{BootError, BootSpec, Protocol, load_elf64, load_initramfs};
use crate::arch::layout::{CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use crate::arch::paging::write_identity_tables;
use crate::arch::regs::Entry;

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" loader id: we are not one of the bootloaders the kernel knows by number.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
/// The 64-bit entry sits 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags`, which says whether the 64-bit entry exists.
const XLOADFLAGS_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;

/// True for anything with a Linux setup header ("HdrS").
pub fn is_bzimage(image: &[u8]) -> bool {
    u32_at(image, 0x202) == Some(HDRS_MAGIC)
}

/// True when the setup header promises the 64-bit entry point this VMM jumps to.
pub fn has_64bit_entry(image: &[u8]) -> bool {
    let version = u16_at(image, 0x206).unwrap_or(0);
    let xloadflags = u16_at(image, 0x236).unwrap_or(0);
    version >= XLOADFLAGS_PROTOCOL && xloadflags & XLF_KERNEL_64 != 0
}

pub fn load(
    mem: &GuestMemoryMmap,
    protocol: Protocol,
    spec: &BootSpec,
) -> Result<Entry, BootError> {
    let (mut loaded, rip) = if protocol == Protocol::BzImage {
        let r = BzImage::load(
            mem,
            None,
            &mut Cursor::new(spec.kernel),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(|e| BootError::Load(e.to_string()))?;
        (r, r.kernel_load.0 + STARTUP_64_OFFSET)
    } else {
        let r = load_elf64(mem, spec.kernel)?;
        let entry = u64_at(spec.kernel, 0x18).unwrap_or(0);
        (r, entry)
    };

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
        // The kernel decompresses itself into [max(load, pref_address), +init_size): nothing
        // may go there, though the compressed image ends far below.
        let start = loaded.kernel_load.0.max(hdr.pref_address);
        let end = start.saturating_add(u64::from(hdr.init_size));
        loaded.kernel_end = loaded.kernel_end.max(end);
        // The kernel's own limit (the setup header's field is its maximum, 2.06+).
        let max = hdr.cmdline_size as usize;
        if max > 0 && spec.cmdline.len() > max {
            return Err(BootError::CmdlineTooLong(spec.cmdline.len(), max));
        }
    } else {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = spec.cmdline.len() as u32;
    if let Some(initramfs) = spec.initramfs {
        // A vmlinux has no setup header to give a limit: use the protocol's documented default.
        let limit = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            l => u64::from(l),
        };
        let placed = load_initramfs(mem, initramfs, loaded.kernel_end, limit, spec.memory_map)?;
        params.hdr.ramdisk_image = placed.addr as u32;
        params.hdr.ramdisk_size = placed.size as u32;
    }
    params.acpi_rsdp_addr = spec.rsdp_addr;
    let n = spec.memory_map.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(&spec.memory_map[..n]) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = n as u8;

    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Load(e.to_string()))?;
    let cr3 = write_identity_tables(mem)?;
    Ok(Entry::Long64 {
        rip,
        zero_page: ZERO_PAGE_START,
        cr3,
    })
}
