//! Finds one ACPI table by signature: RSDP → XSDT (or RSDT) → table, checking the length,
//! bounds and checksum of exactly the structures it reads, with word-wide checksums.
//!
//! This is the lean path for checks that run at every start of a pooled VM (`idle`), where each
//! emulated ring-0 instruction costs microseconds: the `acpi` crate validates every table it
//! walks past byte by byte (checksums, OEM strings as UTF-8). The `acpi` and `cpus` checks keep
//! the full validation, as they are the tests of the VMM's tables.

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

/// Whether the bytes sum to 0 mod 256, added eight at a time: the even and the odd bytes of
/// each word go into 16-bit lanes, which 1 KiB (256 adds of at most 255) cannot overflow.
fn checksum_ok(b: &[u8]) -> bool {
    const EVEN: u64 = 0x00ff_00ff_00ff_00ff;
    let mut sum = 0u8;
    for block in b.chunks(1024) {
        let words = block.chunks_exact(8);
        for &byte in words.remainder() {
            sum = sum.wrapping_add(byte);
        }
        let mut lanes = 0u64;
        for w in words {
            let w = u64::from_le_bytes(w.try_into().unwrap_or_default());
            lanes += (w & EVEN) + ((w >> 8) & EVEN);
        }
        let folded = lanes + (lanes >> 16) + (lanes >> 32) + (lanes >> 48);
        sum = sum.wrapping_add(folded as u8);
    }
    sum == 0
}

/// The system description table at `addr`: its length is sane and mapped, its checksum right.
fn table(addr: u64) -> Result<&'static [u8], String> {
    let header = bytes(addr, SDT_HEADER_LEN).ok_or_else(|| format!("table at bad address {addr:#x}"))?;
    let len = u64::from(u32_at(header, 4));
    let t = bytes(addr, len)
        .filter(|_| (SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&len))
        .ok_or_else(|| format!("table at {addr:#x} has bad length {len}"))?;
    if !checksum_ok(t) {
        return Err(format!("table at {addr:#x} has a wrong checksum"));
    }
    Ok(t)
}

/// The first table with signature `sig` that the root table lists.
pub fn find(rsdp: u64, sig: &[u8; 4]) -> Result<&'static [u8], String> {
    let head = bytes(rsdp, RSDP_V1_LEN).ok_or_else(|| format!("no RSDP (rsdp_paddr={rsdp:#x})"))?;
    if &head[..8] != b"RSD PTR " || !checksum_ok(head) {
        return Err(format!("bad RSDP at {rsdp:#x}"));
    }
    let (root, root_sig, entry_len) = if head[15] >= 2 {
        let v2 = bytes(rsdp, RSDP_V2_LEN).filter(|b| checksum_ok(b));
        let v2 = v2.ok_or("RSDP extended checksum wrong")?;
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
