//! Multiboot v1: the image's header says where it loads; the kernel gets a 32-bit protected-mode
//! entry with EAX = 0x2BADB002 and EBX pointing to the information structure.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::le::{u32_at, u64_at};
use super::{BootError, BootSpec, elf32, load_elf64, load_initramfs, zero_guest};
use crate::arch::e820::E820Kind;
use crate::arch::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MULTIBOOT_INFO_START, MULTIBOOT_MMAP_START,
    MULTIBOOT_MODS_START,
};
use crate::arch::regs::Entry;

const HEADER_MAGIC: u32 = 0x1bad_b002;
const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Header flag: the address fields are valid (a.out kludge), use them instead of the ELF headers.
const FLAG_ADDRESSES: u32 = 1 << 16;
/// Requirement bits (0-15) the spec leaves undefined: a loader must refuse what it does not know.
/// Bits 0-2 (page-aligned modules, memory info, video mode) are honoured or safely absent.
const UNKNOWN_REQUIREMENTS: u32 = 0xfff8;

const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
const LOADER_NAME: &[u8] = b"hyperpool\0";
const LOADER_NAME_OFFSET: u64 = 0x80;
const MODULE_STRING: &[u8] = b"initramfs\0";

/// The fields of a Multiboot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub offset: usize,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// Finds a header (4-byte aligned, valid checksum) in `scan` (the image's first 8 KiB).
pub fn find_header(scan: &[u8]) -> Option<Header> {
    let word = |o: usize| u32_at(scan, o as u64);
    (0..scan.len().saturating_sub(11)).step_by(4).find_map(|o| {
        let (magic, flags, sum) = (word(o)?, word(o + 4)?, word(o + 8)?);
        if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            return None;
        }
        // The address fields only count when the flag says so; then they must all be there.
        let field = |n: usize| match flags & FLAG_ADDRESSES {
            0 => Some(word(o + 12 + n * 4).unwrap_or(0)),
            _ => word(o + 12 + n * 4),
        };
        Some(Header {
            offset: o,
            flags,
            header_addr: field(0)?,
            load_addr: field(1)?,
            load_end_addr: field(2)?,
            bss_end_addr: field(3)?,
            entry_addr: field(4)?,
        })
    })
}

/// Loads by the header's address fields; returns `(entry, end)`.
fn load_by_addresses(
    mem: &GuestMemoryMmap,
    image: &[u8],
    h: &Header,
) -> Result<(u64, u64), BootError> {
    let bad = |what: &str| BootError::Load(format!("Multiboot header: {what}"));
    let start = (h.offset as u64)
        .checked_sub(u64::from(
            h.header_addr
                .checked_sub(h.load_addr)
                .ok_or_else(|| bad("load_addr above header_addr"))?,
        ))
        .ok_or_else(|| bad("load_addr before the start of the file"))? as usize;
    let len = match h.load_end_addr {
        0 => image.len() - start,
        end => end
            .checked_sub(h.load_addr)
            .ok_or_else(|| bad("load_end_addr below load_addr"))? as usize,
    };
    let data = image
        .get(start..start + len)
        .ok_or_else(|| bad("load range past the end of the file"))?;
    let outside = || bad("load range outside guest RAM");
    if u64::from(h.load_addr) < HIMEM_START {
        return Err(bad("load_addr below 1 MiB, where the boot structures live"));
    }
    mem.write_slice(data, GuestAddress(u64::from(h.load_addr)))
        .map_err(|_| outside())?;
    let mut end = u64::from(h.load_addr) + len as u64;
    if h.bss_end_addr != 0 {
        let bss = u64::from(h.bss_end_addr)
            .checked_sub(end)
            .ok_or_else(|| bad("bss_end_addr below load end"))?;
        zero_guest(mem, end, bss)?;
        end = u64::from(h.bss_end_addr);
    }
    Ok((u64::from(h.entry_addr), end))
}

pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Entry, BootError> {
    let scan = &spec.kernel[..spec.kernel.len().min(8192)];
    let header = find_header(scan).ok_or(BootError::NotAKernel)?;
    if header.flags & UNKNOWN_REQUIREMENTS != 0 {
        return Err(BootError::Load(format!(
            "the Multiboot header requires features this loader does not know (flags {:#x})",
            header.flags
        )));
    }
    let (entry, end) = if header.flags & FLAG_ADDRESSES != 0 {
        load_by_addresses(mem, spec.kernel, &header)?
    } else if spec.kernel.get(4) == Some(&2) {
        let r = load_elf64(mem, spec.kernel)?;
        let entry = u64_at(spec.kernel, 0x18).unwrap_or(0);
        (entry, r.kernel_end)
    } else {
        elf32::load(mem, spec.kernel)?
    };

    let info = GuestAddress(MULTIBOOT_INFO_START);
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME;
    let mut mods_count = 0u32;
    if let Some(initramfs) = spec.initramfs {
        let placed = load_initramfs(mem, initramfs, end, u64::from(u32::MAX), spec.memory_map)?;
        let string = MULTIBOOT_MODS_START + 16;
        mem.write_slice(MODULE_STRING, GuestAddress(string))?;
        let module = [
            placed.addr as u32,
            (placed.addr + placed.size) as u32,
            string as u32,
            0,
        ];
        write_u32s(mem, MULTIBOOT_MODS_START, &module)?;
        flags |= INFO_MODS;
        mods_count = 1;
    }

    // mmap entries: u32 size (of the rest, 20), u64 base, u64 length, u32 type.
    let mut mmap = Vec::new();
    for e in spec.memory_map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    mem.write_slice(&mmap, GuestAddress(MULTIBOOT_MMAP_START))?;

    let upper_end = spec
        .memory_map
        .iter()
        .find(|e| e.kind == E820Kind::Ram && e.addr == HIMEM_START)
        .map_or(HIMEM_START, |e| e.addr + e.size);
    let name = MULTIBOOT_INFO_START + LOADER_NAME_OFFSET;
    mem.write_slice(LOADER_NAME, GuestAddress(name))?;
    let mut fields = [0u32; 29];
    fields[0] = flags;
    fields[1] = (EBDA_START / 1024) as u32;
    fields[2] = ((upper_end - HIMEM_START) / 1024) as u32;
    fields[4] = CMDLINE_START as u32;
    fields[5] = mods_count;
    fields[6] = MULTIBOOT_MODS_START as u32;
    fields[11] = mmap.len() as u32;
    fields[12] = MULTIBOOT_MMAP_START as u32;
    fields[16] = name as u32;
    write_u32s(mem, info.0, &fields)?;
    Ok(Entry::Protected32 {
        rip: entry,
        eax: BOOTLOADER_MAGIC,
        ebx: MULTIBOOT_INFO_START as u32,
    })
}

fn write_u32s(mem: &GuestMemoryMmap, addr: u64, words: &[u32]) -> Result<(), BootError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::e820::memory_map;

    fn header(flags: u32, addrs: [u32; 5]) -> Vec<u8> {
        let mut h = Vec::new();
        for w in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
        ] {
            h.extend_from_slice(&w.to_le_bytes());
        }
        for w in addrs {
            h.extend_from_slice(&w.to_le_bytes());
        }
        h
    }

    fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn finds_only_valid_aligned_headers() {
        let mut img = vec![0u8; 64];
        img.extend(header(0, [0; 5]));
        assert_eq!(find_header(&img).unwrap().offset, 64);
        let mut bad = img.clone();
        bad[72] ^= 1;
        assert!(find_header(&bad).is_none(), "checksum");
        let mut unaligned = vec![0u8; 2];
        unaligned.extend(header(0, [0; 5]));
        assert!(find_header(&unaligned).is_none());
    }

    #[test]
    fn aout_kludge_image_boots_with_info() {
        // The header sits at file offset 0 and at address 0x100000; code follows it.
        let base = 0x10_0000u32;
        let mut img = header(FLAG_ADDRESSES, [base, base, 0, base + 0x1000, base + 0x20]);
        img.extend_from_slice(&[0x90; 8]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let map = memory_map(32 << 20);
        let initrd = vec![7u8; 100];
        let spec = BootSpec {
            kernel: &img,
            initramfs: Some(&initrd),
            cmdline: "x",
            memory_map: &map,
            rsdp_addr: 0xe0000,
        };
        let entry = load(&mem, &spec).unwrap();
        assert_eq!(
            entry,
            Entry::Protected32 {
                rip: u64::from(base) + 0x20,
                eax: BOOTLOADER_MAGIC,
                ebx: 0x1000
            }
        );
        let nop: u8 = mem.read_obj(GuestAddress(u64::from(base) + 32)).unwrap();
        assert_eq!(nop, 0x90);
        let flags = read_u32(&mem, 0x1000);
        assert_eq!(
            flags,
            INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME | INFO_MODS
        );
        assert_eq!(read_u32(&mem, 0x1004), 639);
        assert_eq!(read_u32(&mem, 0x1008), (31 << 20) / 1024);
        assert_eq!(read_u32(&mem, 0x1000 + 44), 3 * 24, "three e820 entries");
        let mod_start = read_u32(&mem, MULTIBOOT_MODS_START);
        let mod_end = read_u32(&mem, MULTIBOOT_MODS_START + 4);
        assert_eq!(mod_end - mod_start, 100);
        let first_entry_type = read_u32(&mem, MULTIBOOT_MMAP_START + 20);
        assert_eq!(first_entry_type, 1);
    }

    #[test]
    fn elf32_multiboot_image() {
        let mut img = elf32::tests::elf32(0x20_0000, &[0xf4; 4], 0);
        let h = header(0, [0; 5]);
        img.splice(0x54..0x54, h);
        // Re-point the segment at the moved code: the test ELF keeps its segment after the header.
        let off = 0x54 + 32u32;
        img[0x38..0x3c].copy_from_slice(&off.to_le_bytes());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let map = memory_map(32 << 20);
        let spec = BootSpec {
            kernel: &img,
            initramfs: None,
            cmdline: "",
            memory_map: &map,
            rsdp_addr: 0,
        };
        assert_eq!(
            super::super::detect(&img).unwrap(),
            super::super::Protocol::Multiboot
        );
        let Entry::Protected32 { rip, eax, .. } = load(&mem, &spec).unwrap() else {
            panic!("mode")
        };
        assert_eq!((rip, eax), (0x20_0000, BOOTLOADER_MAGIC));
        let hlt: u8 = mem.read_obj(GuestAddress(0x20_0000)).unwrap();
        assert_eq!(hlt, 0xf4);
    }
}
