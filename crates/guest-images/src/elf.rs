//! Just enough ELF64 (little-endian) reading for this crate: header validation, the Xen
//! PVH entry note of a `vmlinux`, and named sections of a kernel module. All reads are
//! bounds-checked; malformed input yields `None`/an error, never a panic.

/// `e_machine` of x86_64.
pub const EM_X86_64: u16 = 62;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Facts about a 64-bit little-endian ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine` (62 = x86_64).
    pub machine: u16,
    /// `e_type` (2 = executable, 1 = relocatable).
    pub elf_type: u16,
    /// `e_entry`.
    pub entry: u64,
    /// Physical entry address from a PT_NOTE named "Xen" with type 18, if present.
    pub pvh_entry: Option<u64>,
}

pub(crate) fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        d.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        d.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(crate) fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        d.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Why a buffer is not a usable ELF64 little-endian file.
pub fn check_elf64_le(d: &[u8]) -> Result<(), &'static str> {
    if d.len() < 64 {
        return Err("too short for an ELF64 header");
    }
    if &d[..4] != b"\x7fELF" {
        return Err("missing \\x7fELF magic");
    }
    if d[4] != 2 {
        return Err("not a 64-bit ELF (EI_CLASS != ELFCLASS64)");
    }
    if d[5] != 1 {
        return Err("not a little-endian ELF");
    }
    Ok(())
}

/// Parses the header and program headers of an ELF64 little-endian file.
pub fn parse(d: &[u8]) -> Result<ElfInfo, &'static str> {
    check_elf64_le(d)?;
    let short = "truncated ELF header";
    let elf_type = u16_at(d, 16).ok_or(short)?;
    let machine = u16_at(d, 18).ok_or(short)?;
    let entry = u64_at(d, 24).ok_or(short)?;
    let phoff = u64_at(d, 32).ok_or(short)?;
    let phentsize = u16_at(d, 54).ok_or(short)? as usize;
    let phnum = u16_at(d, 56).ok_or(short)? as usize;
    let mut pvh_entry = None;
    if phnum > 0 && phentsize < 56 {
        return Err("ELF program header entries are too small");
    }
    for i in 0..phnum {
        let ph = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i.checked_mul(phentsize)?))
            .ok_or("ELF program header table out of range")?;
        let p_type = u32_at(d, ph).ok_or("truncated ELF program headers")?;
        if p_type != PT_NOTE {
            continue;
        }
        let off = u64_at(d, ph + 8).ok_or("truncated ELF program headers")?;
        let size = u64_at(d, ph + 32).ok_or("truncated ELF program headers")?;
        let notes = usize::try_from(off)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| d.get(o..o.checked_add(s)?))
            .ok_or("ELF PT_NOTE segment lies outside the file")?;
        if let Some(e) = find_pvh_note(notes) {
            pvh_entry = Some(e);
        }
    }
    Ok(ElfInfo {
        machine,
        elf_type,
        entry,
        pvh_entry,
    })
}

fn align4(n: usize) -> Option<usize> {
    Some(n.checked_add(3)? & !3)
}

/// Walks a note segment looking for the Xen PVH entry note.
fn find_pvh_note(mut notes: &[u8]) -> Option<u64> {
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0)? as usize;
        let descsz = u32_at(notes, 4)? as usize;
        let ntype = u32_at(notes, 8)?;
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = align4(name_end)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let name = notes.get(12..name_end)?;
        let desc = notes.get(desc_start..desc_end)?;
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" {
            return match descsz {
                4 => u32_at(desc, 0).map(u64::from),
                8 => u64_at(desc, 0),
                _ => None,
            };
        }
        notes = notes.get(align4(desc_end)?.min(notes.len())..)?;
    }
    None
}

/// Returns the contents of the section named `wanted` (e.g. `.modinfo`).
pub fn section<'a>(d: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    check_elf64_le(d).ok()?;
    let shoff = usize::try_from(u64_at(d, 40)?).ok()?;
    let shentsize = u16_at(d, 58)? as usize;
    let shnum = u16_at(d, 60)? as usize;
    let shstrndx = u16_at(d, 62)? as usize;
    if shentsize < 64 {
        return None;
    }
    let sh = |i: usize| -> Option<(u32, &'a [u8])> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(d, base)?;
        let off = usize::try_from(u64_at(d, base + 24)?).ok()?;
        let size = usize::try_from(u64_at(d, base + 32)?).ok()?;
        let sh_type = u32_at(d, base + 4)?;
        // SHT_NOBITS has no file contents.
        let data = if sh_type == 8 {
            &[][..]
        } else {
            d.get(off..off.checked_add(size)?)?
        };
        Some((name, data))
    };
    let (_, strtab) = sh(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_off, data) = sh(i)?;
        let rest = strtab.get(name_off as usize..)?;
        let name = &rest[..rest.iter().position(|&b| b == 0)?];
        (name == wanted.as_bytes()).then_some(data)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 x86_64 executable with one PT_NOTE segment holding `notes`.
    pub(crate) fn tiny_elf(notes: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; 64 + 56];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2; // ELFCLASS64
        d[5] = 1; // little endian
        d[6] = 1; // EV_CURRENT
        d[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        d[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        d[20..24].copy_from_slice(&1u32.to_le_bytes());
        d[24..32].copy_from_slice(&0x0100_0000u64.to_le_bytes()); // e_entry
        d[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        d[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        d[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        d[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        d[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        d[ph + 8..ph + 16].copy_from_slice(&(120u64).to_le_bytes()); // p_offset
        d[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes()); // p_filesz
        d.extend_from_slice(notes);
        d
    }

    pub(crate) fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&ntype.to_le_bytes());
        n.extend_from_slice(name);
        n.push(0);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n.extend_from_slice(desc);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n
    }

    #[test]
    fn finds_pvh_note_after_other_notes() {
        let mut notes = note(b"GNU", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen", 6, b"linux\0"));
        notes.extend(note(b"Xen", 18, &0x0100_0abcu32.to_le_bytes()));
        let info = parse(&tiny_elf(&notes)).unwrap();
        assert_eq!(info.machine, EM_X86_64);
        assert_eq!(info.pvh_entry, Some(0x0100_0abc));
    }

    #[test]
    fn no_pvh_note() {
        let info = parse(&tiny_elf(&note(b"GNU", 18, &[0; 4]))).unwrap();
        assert_eq!(info.pvh_entry, None);
    }

    #[test]
    fn malformed_inputs_do_not_panic() {
        let good = tiny_elf(&note(b"Xen", 18, &[0; 4]));
        for len in 0..good.len() {
            let _ = parse(&good[..len]);
            let _ = section(&good[..len], ".modinfo");
        }
        let mut bad = good.clone();
        bad[120..124].copy_from_slice(&u32::MAX.to_le_bytes()); // huge namesz
        assert_eq!(parse(&bad).unwrap().pvh_entry, None);
        assert!(parse(b"\x7fELF\x01").is_err());
    }
}
