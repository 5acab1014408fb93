//! Loading a kernel and handing it what its boot protocol promises: memory map, command line,
//! initramfs, ACPI root pointer.

mod elf32;
pub mod elf64;
mod le;
pub mod linux;
pub mod multiboot;
pub mod pvh;

use std::io::Cursor;

use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::e820::E820Entry;
use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO32_START};
use super::regs::Entry;

/// The boot protocol a kernel image asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note.
    Pvh,
    /// Any image with a Multiboot v1 header in its first 8 KiB.
    Multiboot,
    /// A 64-bit ELF `vmlinux` without a PVH note: Linux's 64-bit entry.
    LinuxElf,
    /// A bzImage: Linux's 64-bit entry after the setup header.
    BzImage,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pvh => "PVH (ELF)",
            Protocol::Multiboot => "Multiboot",
            Protocol::LinuxElf => "Linux 64-bit (ELF vmlinux)",
            Protocol::BzImage => "Linux 64-bit (bzImage)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "is not a kernel this VMM can boot: expected an ELF with a PVH note, a bzImage, a 64-bit vmlinux or a Multiboot image"
    )]
    NotAKernel,
    #[error("is a 32-bit ELF without a Multiboot header; only Multiboot kernels may be 32-bit")]
    Elf32WithoutMultiboot,
    #[error("is a 32-bit (or pre-2.12 protocol) bzImage; only 64-bit kernels boot here")]
    NotKernel64,
    #[error("cannot be loaded: {0}")]
    Load(String),
    #[error("the kernel command line is {0} bytes; the limit is {1}")]
    CmdlineTooLong(usize, usize),
    #[error(
        "the initramfs ({size} bytes) does not fit in guest RAM below {limit:#x} after the kernel; give the VM more memory"
    )]
    InitramfsTooLarge { size: u64, limit: u64 },
    #[error("writing boot data to guest memory failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What to boot and what to hand it.
pub struct BootSpec<'a> {
    pub kernel: &'a [u8],
    pub initramfs: Option<&'a [u8]>,
    pub cmdline: &'a str,
    pub memory_map: &'a [E820Entry],
    pub rsdp_addr: u64,
}

/// Where the initramfs was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub addr: u64,
    pub size: u64,
}

const MULTIBOOT_SCAN: usize = 8192;

/// Decides the protocol from the image's bytes.
pub fn detect(kernel: &[u8]) -> Result<Protocol, BootError> {
    let has_multiboot =
        multiboot::find_header(&kernel[..kernel.len().min(MULTIBOOT_SCAN)]).is_some();
    if kernel.starts_with(b"\x7fELF") {
        return match kernel.get(4) {
            Some(1) if has_multiboot => Ok(Protocol::Multiboot),
            Some(1) => Err(BootError::Elf32WithoutMultiboot),
            Some(2) if elf64::pvh_entry(kernel).is_some() => Ok(Protocol::Pvh),
            Some(2) if has_multiboot => Ok(Protocol::Multiboot),
            Some(2) => Ok(Protocol::LinuxElf),
            _ => Err(BootError::NotAKernel),
        };
    }
    if linux::is_bzimage(kernel) {
        return match linux::has_64bit_entry(kernel) {
            true => Ok(Protocol::BzImage),
            false => Err(BootError::NotKernel64),
        };
    }
    if has_multiboot {
        return Ok(Protocol::Multiboot);
    }
    Err(BootError::NotAKernel)
}

/// Loads the kernel, command line and initramfs and writes the protocol's boot structures.
pub fn load(
    mem: &GuestMemoryMmap,
    protocol: Protocol,
    spec: &BootSpec,
) -> Result<Entry, BootError> {
    write_cmdline(mem, spec.cmdline)?;
    match protocol {
        Protocol::Pvh => pvh::load(mem, spec),
        Protocol::Multiboot => multiboot::load(mem, spec),
        Protocol::LinuxElf | Protocol::BzImage => linux::load(mem, protocol, spec),
    }
}

pub(crate) fn load_elf64(
    mem: &GuestMemoryMmap,
    kernel: &[u8],
) -> Result<KernelLoaderResult, BootError> {
    // linux-loader checks the entry point but not where segments land: one below 1 MiB would
    // overwrite the boot structures (GDT, start info, command line, ACPI tables).
    match elf64::lowest_load_address(kernel) {
        Some(low) if low < HIMEM_START => {
            return Err(BootError::Load(format!(
                "a segment loads at {low:#x}, below 1 MiB where the boot structures live"
            )));
        }
        None => return Err(BootError::Load("malformed ELF program headers".into())),
        Some(_) => {}
    }
    Elf::load(
        mem,
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| BootError::Load(e.to_string()))
}

/// Zeroes `[addr, addr + len)` of guest RAM (a kernel's bss) after checking the whole range is
/// RAM, so a bogus size from the image fails cleanly instead of allocating or touching gigabytes.
pub(crate) fn zero_guest(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), BootError> {
    let outside = || BootError::Load(format!("{addr:#x}+{len:#x} lies outside guest RAM"));
    let len_usize = usize::try_from(len).map_err(|_| outside())?;
    if len == 0 {
        return Ok(());
    }
    if !mem.check_range(GuestAddress(addr), len_usize) {
        return Err(outside());
    }
    const CHUNK: u64 = 64 << 10;
    let zeroes = [0u8; CHUNK as usize];
    let mut at = addr;
    let end = addr + len;
    while at < end {
        let n = (end - at).min(CHUNK) as usize;
        mem.write_slice(&zeroes[..n], GuestAddress(at))?;
        at += n as u64;
    }
    Ok(())
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1,
        ));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))?;
    Ok(())
}

/// Places the initramfs at the top of RAM below the hole (and below `limit`), page-aligned, above
/// `kernel_end`, the way bootloaders do: far from where the kernel decompresses itself.
pub(crate) fn load_initramfs(
    mem: &GuestMemoryMmap,
    data: &[u8],
    kernel_end: u64,
    limit: u64,
    memory_map: &[E820Entry],
) -> Result<Placed, BootError> {
    let size = data.len() as u64;
    let ram_top = memory_map
        .iter()
        .filter(|e| e.kind == super::e820::E820Kind::Ram && e.addr < MMIO32_START)
        .map(|e| e.addr + e.size)
        .max()
        .unwrap_or(0)
        .min(limit.saturating_add(1));
    let too_large = BootError::InitramfsTooLarge {
        size,
        limit: ram_top,
    };
    let addr = ram_top.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(BootError::InitramfsTooLarge {
            size,
            limit: ram_top,
        });
    }
    mem.write_slice(data, GuestAddress(addr))?;
    Ok(Placed { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::e820::memory_map;

    #[test]
    fn detects_by_content() {
        assert!(matches!(detect(b"hello"), Err(BootError::NotAKernel)));
        assert!(matches!(detect(&[0u8; 4096]), Err(BootError::NotAKernel)));
        let mut elf32 = vec![0u8; 64];
        elf32[..5].copy_from_slice(b"\x7fELF\x01");
        assert!(matches!(
            detect(&elf32),
            Err(BootError::Elf32WithoutMultiboot)
        ));
        let mut elf64 = vec![0u8; 64];
        elf64[..5].copy_from_slice(b"\x7fELF\x02");
        assert_eq!(detect(&elf64).unwrap(), Protocol::LinuxElf);
        let mut bz = vec![0u8; 1024];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        assert!(matches!(detect(&bz), Err(BootError::NotKernel64)));
        bz[0x236] = 1;
        assert_eq!(detect(&bz).unwrap(), Protocol::BzImage);
    }

    #[test]
    fn initramfs_goes_high_and_aligned() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = memory_map(64 << 20);
        let data = vec![0xabu8; 5000];
        let p = load_initramfs(&mem, &data, 2 << 20, u64::MAX, &map).unwrap();
        assert_eq!(p.addr % 4096, 0);
        assert!(p.addr + p.size <= 64 << 20);
        assert!(p.addr > (60 << 20));
        let back: u8 = mem.read_obj(GuestAddress(p.addr + 4999)).unwrap();
        assert_eq!(back, 0xab);
        let limited = load_initramfs(&mem, &data, 2 << 20, (16 << 20) - 1, &map).unwrap();
        assert!(limited.addr + limited.size <= 16 << 20);
        let huge = vec![0u8; 63 << 20];
        assert!(matches!(
            load_initramfs(&mem, &huge, 2 << 20, u64::MAX, &map),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_limit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let mut b = [0u8; 14];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&b, b"console=ttyS0\0");
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&mem, &long),
            Err(BootError::CmdlineTooLong(..))
        ));
    }
}
