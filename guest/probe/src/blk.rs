//! The `blk` check: on every modern virtio-blk function (1af4:1042), through `virtio-drivers`,
//! write 8 sectors of `HYPERPOOL-PROBE-<lba>` (padded with `.`) at LBA 1..=8, flush, read them
//! back and compare; a read-only disk (VIRTIO_BLK_F_RO) must refuse the write.
//!
//! Polled in ring 0: one request of 4 KiB each way per disk.

use crate::println;
use crate::virtio::{self, BarNote, Found, ProbeHal};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::pci::VIRTIO_VENDOR_ID;

/// Modern virtio-blk PCI device id (0x1040 + 2).
pub const BLK_MODERN: u16 = 0x1042;
const FIRST_LBA: usize = 1;
const SECTORS: usize = 8;

/// `HYPERPOOL-PROBE-<lba>` padded with `.` to a sector.
fn pattern() -> Vec<u8> {
    let mut buf = vec![b'.'; SECTORS * SECTOR_SIZE];
    for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let text = format!("HYPERPOOL-PROBE-{}", FIRST_LBA + i);
        sector[..text.len()].copy_from_slice(text.as_bytes());
    }
    buf
}

/// Exercises one disk (`found.functions[i]`); returns `<id or slot>:rw|ro`.
pub fn check_disk(found: &mut Found, i: usize) -> Result<String, String> {
    let df = found.functions[i].df;
    let transport = found.open(i, BarNote::Index)?;
    let mut blk =
        VirtIOBlk::<ProbeHal, _>::new(transport).map_err(|e| format!("{df} init: {e}"))?;
    let capacity = blk.capacity();
    if capacity < (FIRST_LBA + SECTORS) as u64 {
        return Err(format!("{df} capacity {capacity} sectors is too small"));
    }
    let mut id = [0u8; 20];
    let id_len = blk
        .device_id(&mut id)
        .map_err(|e| format!("{df} get_id: {e}"))?;
    let name = match core::str::from_utf8(&id[..id_len]) {
        Ok(s) if !s.is_empty() => String::from(s),
        _ => format!("{df}"),
    };
    let want = pattern();
    let mut got = vec![0u8; want.len()];
    let mode = if blk.readonly() {
        if blk.write_blocks(FIRST_LBA, &want).is_ok() {
            return Err(format!("{name}: write to a read-only disk succeeded"));
        }
        blk.read_blocks(FIRST_LBA, &mut got)
            .map_err(|e| format!("{name}: read: {e}"))?;
        "ro"
    } else {
        blk.write_blocks(FIRST_LBA, &want)
            .map_err(|e| format!("{name}: write: {e}"))?;
        blk.flush().map_err(|e| format!("{name}: flush: {e}"))?;
        blk.read_blocks(FIRST_LBA, &mut got)
            .map_err(|e| format!("{name}: read: {e}"))?;
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("{name}: read back differs at byte {at}"));
        }
        "rw"
    };
    println!("blk: {df} {name} capacity={capacity} {mode}");
    Ok(format!("{name}:{mode}"))
}

/// The `blk` check.
pub fn check(rsdp: u64) -> Result<String, String> {
    let mut found = virtio::find_id(rsdp, BLK_MODERN)?;
    if found.functions.is_empty() {
        return Err(format!(
            "no virtio 1.x block device ({VIRTIO_VENDOR_ID:04x}:{BLK_MODERN:04x}) on bus 0"
        ));
    }
    let mut results = Vec::new();
    for i in 0..found.functions.len() {
        results.push(check_disk(&mut found, i)?);
    }
    Ok(format!("disks={} {}", results.len(), results.join(",")))
}
