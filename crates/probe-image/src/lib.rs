//! The hyperpool probe guest, embedded.
//!
//! `build.rs` builds `guest/probe` (a separate, bare-metal cargo workspace) and this crate
//! exposes the resulting static PVH ELFs (load address 1 MiB, `XEN_ELFNOTE_PHYS32_ENTRY`
//! note in a `PT_NOTE` segment):
//!
//! - [`PROBE_ELF`]: the probe. Command line `probe=cmdline,mem,acpi,cpus,ring3` selects
//!   checks (default `cpus,mem,acpi`), `probe.end=poweroff|reset|acpi-reset|exit:N|halt|triple`
//!   the final action (default `poweroff`). Prints `hyperpool-probe: start`, one
//!   `PROBE <check> ok ...`/`PROBE <check> FAIL ...` line per check and `PROBE done` on COM1.
//! - [`TINY_ELF`]: writes port 0x440, prints `hyperpool-tiny\n`, writes 0 to port 0xf4.
//! - [`TINY_IDLE_ELF`]: like `TINY_ELF` but then `cli; hlt` forever.

/// The probe guest.
pub const PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));
/// Minimal guest: boot mark, one line, debug-exit.
pub const TINY_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny.elf"));
/// Minimal guest: boot mark, one line, idle forever.
pub const TINY_IDLE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny-idle.elf"));
/// Multiboot v1 test kernel (no PVH note): checks the loader's magic and information structure,
/// then debug-exits with 0x10 (ok) or 0x11.
pub const TINY_MULTIBOOT_ELF: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tiny-multiboot.elf"));

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// (p_type, p_offset, p_paddr, p_filesz, p_memsz)
    fn program_headers(elf: &[u8]) -> Vec<(u32, usize, u64, usize, u64)> {
        let phoff = u64_at(elf, 0x20) as usize;
        let phentsize = u16_at(elf, 0x36) as usize;
        let phnum = u16_at(elf, 0x38) as usize;
        assert_eq!(phentsize, 56);
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                (
                    u32_at(elf, p),
                    u64_at(elf, p + 8) as usize,
                    u64_at(elf, p + 24),
                    u64_at(elf, p + 32) as usize,
                    u64_at(elf, p + 40),
                )
            })
            .collect()
    }

    /// Returns the PVH entry from the Xen PHYS32_ENTRY note.
    fn check_pvh_elf(name: &str, elf: &[u8]) -> u32 {
        assert!(elf.len() > 64, "{name}: too short");
        assert_eq!(&elf[..4], b"\x7fELF", "{name}: not ELF");
        assert_eq!(elf[4], 2, "{name}: not ELF64");
        assert_eq!(elf[5], 1, "{name}: not little endian");
        assert_eq!(u16_at(elf, 0x10), 2, "{name}: not ET_EXEC");
        assert_eq!(u16_at(elf, 0x12), 62, "{name}: not x86_64");
        let phdrs = program_headers(elf);
        let mut entry = None;
        for &(_, off, _, filesz, _) in phdrs.iter().filter(|p| p.0 == PT_NOTE) {
            let notes = &elf[off..off + filesz];
            let mut o = 0;
            while o + 12 <= notes.len() {
                let namesz = u32_at(notes, o) as usize;
                let descsz = u32_at(notes, o + 4) as usize;
                let ntype = u32_at(notes, o + 8);
                let name = &notes[o + 12..o + 12 + namesz];
                let desc_off = o + 12 + namesz.next_multiple_of(4);
                if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
                    assert_eq!(descsz, 4, "{name:?}: PHYS32_ENTRY desc size");
                    entry = Some(u32_at(notes, desc_off));
                }
                o = desc_off + descsz.next_multiple_of(4);
            }
        }
        let entry =
            entry.unwrap_or_else(|| panic!("{name}: no Xen PHYS32_ENTRY note in a PT_NOTE"));
        let loads: Vec<_> = phdrs.iter().filter(|p| p.0 == PT_LOAD).collect();
        assert!(!loads.is_empty(), "{name}: no PT_LOAD");
        assert!(
            loads.iter().all(|p| p.2 >= 0x100000),
            "{name}: segment below 1 MiB"
        );
        assert!(
            loads
                .iter()
                .any(|p| (p.2..p.2 + p.4).contains(&(entry as u64))),
            "{name}: entry {entry:#x} outside the loaded segments"
        );
        entry
    }

    #[test]
    fn probe_is_pvh_elf() {
        assert_eq!(check_pvh_elf("probe", PROBE_ELF), 0x100000);
    }

    #[test]
    fn tiny_is_pvh_elf() {
        assert_eq!(check_pvh_elf("tiny", TINY_ELF), 0x100000);
    }

    #[test]
    fn tiny_idle_is_pvh_elf() {
        assert_eq!(check_pvh_elf("tiny-idle", TINY_IDLE_ELF), 0x100000);
    }
}
