//! What the VMM reads from a 64-bit ELF before loading it (linux-loader does the loading): its
//! program headers, and the PVH entry point from a `Xen` PHYS32_ENTRY note. The file is user
//! input: every offset is checked and nothing here can panic.

use super::le::{u16_at, u32_at, u64_at};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    pub kind: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
}

/// The program headers, or `None` if the table lies outside the file.
pub fn program_headers(elf: &[u8]) -> Option<Vec<ProgramHeader>> {
    let phoff = u64_at(elf, 0x20)?;
    let entsize = u64::from(u16_at(elf, 0x36)?);
    let count = u16_at(elf, 0x38)?;
    (0..u64::from(count))
        .map(|i| {
            let at = phoff.checked_add(i.checked_mul(entsize)?)?;
            Some(ProgramHeader {
                kind: u32_at(elf, at)?,
                offset: u64_at(elf, at.checked_add(8)?)?,
                paddr: u64_at(elf, at.checked_add(24)?)?,
                filesz: u64_at(elf, at.checked_add(32)?)?,
            })
        })
        .collect()
}

/// Lowest physical address a PT_LOAD segment asks for.
pub fn lowest_load_address(elf: &[u8]) -> Option<u64> {
    program_headers(elf)?
        .iter()
        .filter(|p| p.kind == PT_LOAD)
        .map(|p| p.paddr)
        .min()
}

/// The 32-bit PVH entry point, from the first `Xen` note of type PHYS32_ENTRY.
pub fn pvh_entry(elf: &[u8]) -> Option<u64> {
    program_headers(elf)?
        .iter()
        .filter(|p| p.kind == PT_NOTE)
        .find_map(|p| note_entry(elf, p.offset, p.filesz))
}

fn note_entry(elf: &[u8], offset: u64, size: u64) -> Option<u64> {
    let end = offset.checked_add(size)?.min(elf.len() as u64);
    let mut at = offset;
    while at.checked_add(12)? <= end {
        let namesz = u64::from(u32_at(elf, at)?);
        let descsz = u64::from(u32_at(elf, at + 4)?);
        let kind = u32_at(elf, at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.div_ceil(4) * 4)?;
        let name = elf.get(
            usize::try_from(name_at).ok()?..usize::try_from(name_at.checked_add(namesz)?).ok()?,
        );
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == Some(b"Xen\0".as_slice()) {
            // The descriptor is 4 bytes (some kernels pad it to 8): the entry is its low half.
            return u32_at(elf, desc_at).map(u64::from);
        }
        at = desc_at.checked_add(descsz.div_ceil(4) * 4)?;
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ELF64 header with one PT_LOAD at `paddr` and one PT_NOTE holding `notes`.
    pub fn elf64(paddr: u64, notes: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 0x40 + 2 * 56];
        e[..5].copy_from_slice(b"\x7fELF\x02");
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        let note_off = e.len() as u64;
        for (i, (kind, off, pa, sz)) in [
            (PT_LOAD, 0u64, paddr, 0u64),
            (PT_NOTE, note_off, 0, notes.len() as u64),
        ]
        .into_iter()
        .enumerate()
        {
            let ph = 0x40 + i * 56;
            e[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            e[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
            e[ph + 24..ph + 32].copy_from_slice(&pa.to_le_bytes());
            e[ph + 32..ph + 40].copy_from_slice(&sz.to_le_bytes());
        }
        e.extend_from_slice(notes);
        e
    }

    pub fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn finds_the_pvh_note_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 18, &0x100_0950u32.to_le_bytes()));
        let e = elf64(0x100_0000, &notes);
        assert_eq!(pvh_entry(&e), Some(0x100_0950));
        assert_eq!(lowest_load_address(&e), Some(0x100_0000));
        assert_eq!(
            pvh_entry(&elf64(0x100_0000, &note(b"Xen\0", 5, &[0; 4]))),
            None
        );
    }

    #[test]
    fn hostile_headers_do_not_panic() {
        let mut e = elf64(0, &[]);
        e[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(program_headers(&e), None);
        assert_eq!(pvh_entry(&e), None);
        let mut e = elf64(0, &note(b"Xen\0", 18, &[0; 4]));
        let note_ph = 0x40 + 56;
        e[note_ph + 32..note_ph + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        let _ = pvh_entry(&e);
        let mut bad = note(b"Xen\0", 18, &[]);
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&elf64(0, &bad)), None);
        assert_eq!(program_headers(b"\x7fELF\x02"), None);
    }
}
