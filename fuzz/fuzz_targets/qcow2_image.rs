//! qcow2 images as the VMM opens them: the input's image is written to a file (tmpfs) and opened
//! with `Qcow2File::open` (header checks, then `imago`), following the VMM's rule that a detected
//! qcow2 never follows a backing file; with an explicit format it does, within the scratch
//! directory only (a name with a `/` is a host path the user chose, not image content). Then the
//! requests the block device would make: reads, writes, WRITE_ZEROES, DISCARD, FLUSH — whole
//! sectors inside the disk, never writes on a read-only disk, as the device guarantees.
//!
//! Checked: no panic, no hang (libFuzzer's -timeout), no absurd allocation (-rss_limit_mb,
//! -malloc_limit_mb); the disk size is a whole number of sectors; what was written (or zeroed)
//! reads back.

#![no_main]

use hyperpool_devices::virtio::block::qcow2::{self, Qcow2File};
use hyperpool_devices::virtio::block::{DiskBackend, SECTOR_SIZE};
use hyperpool_fuzz::qcow2_case::{MAX_SECTORS, Qcow2Case, kind};
use hyperpool_fuzz::scratch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let case = Qcow2Case::decode(data);
    let dir = scratch::dir();
    let path = dir.path().join("image.qcow2");
    std::fs::write(&path, case.image).expect("writing the image");
    if qcow2::names_backing_file(&path) {
        if !case.explicit_format {
            return; // the VMM refuses it before opening
        }
        let file_len = case.image.len() as u64;
        let backing = qcow2::check_header(&case.image[..case.image.len().min(64 << 10)], file_len)
            .ok()
            .and_then(|h| h.backing);
        if backing.is_some_and(|name| name.contains('/')) {
            return;
        }
    }
    let Ok(disk) = Qcow2File::open(&path, case.readonly) else {
        return;
    };
    let size = disk.size();
    assert!(size > 0 && size % SECTOR_SIZE == 0, "disk size {size}");
    let disk_sectors = size / SECTOR_SIZE;
    for req in &case.reqs {
        let first = req.sector % disk_sectors;
        let count = (u64::from(req.sectors) % (MAX_SECTORS + 1)).min(disk_sectors - first);
        let (offset, len) = (first * SECTOR_SIZE, (count * SECTOR_SIZE) as usize);
        let writes = !matches!(req.kind, kind::READ | kind::FLUSH);
        if (writes && case.readonly) || (len == 0 && req.kind != kind::FLUSH) {
            continue;
        }
        let expect = match req.kind {
            kind::READ => {
                let mut buf = vec![0u8; len];
                let _ = disk.read_at(&mut buf, offset);
                None
            }
            kind::WRITE => {
                let buf = vec![req.fill; len];
                disk.write_at(&buf, offset).ok().map(|()| buf)
            }
            kind::WRITE_ZEROES | kind::WRITE_ZEROES_UNMAP => disk
                .write_zeroes(offset, len as u64, req.kind == kind::WRITE_ZEROES_UNMAP)
                .ok()
                .map(|()| vec![0u8; len]),
            kind::DISCARD => {
                let _ = disk.discard(offset, len as u64);
                None
            }
            _ => {
                let _ = disk.flush();
                None
            }
        };
        if let Some(want) = expect {
            let mut got = vec![0u8; len];
            if disk.read_at(&mut got, offset).is_ok() {
                assert!(
                    got == want,
                    "{req:?}: data at {offset:#x} does not read back"
                );
            }
        }
    }
});
