//! Finds one ACPI table by signature: RSDP → XSDT (or RSDT) → table, checking signatures,
//! lengths and that every byte it reads lies in mapped memory, but no checksums.
//!
//! This is the lean path for checks that run at every start of a pooled VM (`idle`), where each
//! emulated ring-0 instruction costs microseconds: the `acpi` crate validates every table it
//! walks past byte by byte (checksums, OEM strings as UTF-8), and even a word-wide checksum of
//! the RSDP, XSDT and MADT cost ~450 instructions. Checksums guard against corrupt firmware,
//! not hostile input (the bounds checks do that); the `acpi` check verifies every checksum, and
//! it and `cpus` keep the `acpi` crate's full validation: they are the tests of the VMM's tables.

use alloc::format;
use alloc::string::String;

/// Tables larger than this are treated as corrupt.
const MAX_TABLE_LEN: u64 = 16 << 20;
const SDT_HEADER_LEN: u64 = 36;
const RSDP_V1_LEN: u64 = 20;
const RSDP_V2_LEN: u64 = 36;

/// `len` bytes at `addr`, if the whole range lies in the identity map.
fn bytes(addr: u64, len: u64) -> Option<&'static [u8]> {
    let end = addr.checked_add(len)?;
    if addr == 0 || end > crate::paging::MAPPED_LIMIT {
        return None;
    }
    // SAFETY: the range is inside the identity map (checked above); firmware tables stay
    // unchanged for the whole run. Any byte values are valid u8s.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The system description table at `addr`, if its length is sane and it is all mapped.
fn table(addr: u64) -> Result<&'static [u8], String> {
    let header =
        bytes(addr, SDT_HEADER_LEN).ok_or_else(|| format!("table at bad address {addr:#x}"))?;
    let len = u64::from(u32_at(header, 4));
    bytes(addr, len)
        .filter(|_| (SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&len))
        .ok_or_else(|| format!("table at {addr:#x} has bad length {len}"))
}

/// The first table with signature `sig` that the root table lists.
pub fn find(rsdp: u64, sig: &[u8; 4]) -> Result<&'static [u8], String> {
    let head = bytes(rsdp, RSDP_V1_LEN).ok_or_else(|| format!("no RSDP (rsdp_paddr={rsdp:#x})"))?;
    if &head[..8] != b"RSD PTR " {
        return Err(format!("no RSDP signature at {rsdp:#x}"));
    }
    let (root, root_sig, entry_len) = if head[15] >= 2 {
        let v2 = bytes(rsdp, RSDP_V2_LEN).ok_or("RSDP 2.0 beyond the mapped memory")?;
        (u64_at(v2, 24), b"XSDT", 8)
    } else {
        (u64::from(u32_at(head, 16)), b"RSDT", 4)
    };
    let root = table(root)?;
    if &root[..4] != root_sig {
        return Err("root table signature wrong".into());
    }
    for entry in root[SDT_HEADER_LEN as usize..].chunks_exact(entry_len) {
        let addr = if entry_len == 8 {
            u64_at(entry, 0)
        } else {
            u64::from(u32_at(entry, 0))
        };
        let found = bytes(addr, 4).is_some_and(|s| s == sig);
        if found {
            return table(addr);
        }
    }
    Err(format!(
        "no {} table",
        sig.map(|b| if b.is_ascii_graphic() { b as char } else { '?' })
            .iter()
            .collect::<String>()
    ))
}
