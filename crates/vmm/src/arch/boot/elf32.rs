//! Loading a 32-bit ELF's PT_LOAD segments at their physical addresses (Multiboot kernels are
//! often ELF32, which linux-loader does not take).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::le::{u16_at, u32_at};
use super::{BootError, zero_guest};
use crate::arch::layout::HIMEM_START;

const PT_LOAD: u32 = 1;

/// Loads every PT_LOAD segment (file bytes, then zeroes up to `p_memsz`); returns
/// `(entry, end of the highest segment)`.
pub fn load(mem: &GuestMemoryMmap, elf: &[u8]) -> Result<(u64, u64), BootError> {
    let bad = |what: &str| BootError::Load(format!("malformed 32-bit ELF: {what}"));
    if !elf.starts_with(b"\x7fELF\x01\x01") {
        return Err(bad("not a little-endian ELF32"));
    }
    let entry = u32_at(elf, 0x18).ok_or_else(|| bad("short header"))?;
    let phoff = u32_at(elf, 0x1c).ok_or_else(|| bad("short header"))? as usize;
    let phentsize = usize::from(u16_at(elf, 0x2a).ok_or_else(|| bad("short header"))?);
    let phnum = usize::from(u16_at(elf, 0x2c).ok_or_else(|| bad("short header"))?);
    if phentsize < 32 {
        return Err(bad("program header entries too small"));
    }
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset"))?;
        let field = |n: usize| {
            u32_at(elf, (ph + n * 4) as u64).ok_or_else(|| bad("truncated program header"))
        };
        if field(0)? != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) =
            (field(1)? as usize, field(3)?, field(4)? as usize, field(5)?);
        if (memsz as usize) < filesz {
            return Err(bad("segment file size exceeds its memory size"));
        }
        let data = offset
            .checked_add(filesz)
            .and_then(|e| elf.get(offset..e))
            .ok_or_else(|| bad("segment extends past the end of the file"))?;
        if u64::from(paddr) < HIMEM_START {
            return Err(BootError::Load(format!(
                "a segment loads at {paddr:#x}, below 1 MiB where the boot structures live"
            )));
        }
        let addr = GuestAddress(u64::from(paddr));
        mem.write_slice(data, addr).map_err(|_| {
            BootError::Load(format!(
                "segment at {paddr:#x} (+{memsz:#x}) is outside guest RAM"
            ))
        })?;
        zero_guest(
            mem,
            u64::from(paddr) + filesz as u64,
            u64::from(memsz) - filesz as u64,
        )?;
        end = end.max(u64::from(paddr) + u64::from(memsz));
    }
    if end == 0 {
        return Err(bad("no loadable segment"));
    }
    Ok((u64::from(entry), end))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF32 with one PT_LOAD segment carrying `code` at `paddr`, plus `bss` zero bytes.
    pub fn elf32(paddr: u32, code: &[u8], bss: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x54];
        e[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
        e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        e[0x12..0x14].copy_from_slice(&3u16.to_le_bytes());
        e[0x18..0x1c].copy_from_slice(&paddr.to_le_bytes());
        e[0x1c..0x20].copy_from_slice(&0x34u32.to_le_bytes());
        e[0x2a..0x2c].copy_from_slice(&32u16.to_le_bytes());
        e[0x2c..0x2e].copy_from_slice(&1u16.to_le_bytes());
        let ph = [
            PT_LOAD,
            0x54,
            paddr,
            paddr,
            code.len() as u32,
            code.len() as u32 + bss,
            7,
            4,
        ];
        for (i, v) in ph.iter().enumerate() {
            e[0x34 + i * 4..0x38 + i * 4].copy_from_slice(&v.to_le_bytes());
        }
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_slice(&[0xff; 16], GuestAddress(0x200004))
            .unwrap();
        let (entry, end) = load(&mem, &elf32(0x200000, &[1, 2, 3, 4], 16)).unwrap();
        assert_eq!((entry, end), (0x200000, 0x200014));
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(0x200000)).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_bad_images() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        assert!(load(&mem, b"\x7fELF\x02").is_err());
        assert!(load(&mem, &elf32(0x8000, &[1], 0)).is_err(), "below 1 MiB");
        assert!(
            load(&mem, &elf32(0x200000, &[1], 0xffff_0000)).is_err(),
            "bss past RAM"
        );
        let mut e = elf32(0x200000, &[1, 2], 0);
        e.truncate(0x54);
        assert!(load(&mem, &e).is_err(), "segment past EOF");
        assert!(
            load(&mem, &elf32(0x1000_0000, &[1], 0)).is_err(),
            "outside RAM"
        );
    }
}
