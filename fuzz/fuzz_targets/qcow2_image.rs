//! qcow2 images as the VMM opens them: the input's image is written to a file (tmpfs) and opened
//! with `Qcow2File::open` (header checks, then `imago`), following the VMM's rule that a detected
//! qcow2 never follows a backing file; with an explicit format it does, within the scratch
//! directory only (a name with a `/` is a host path the user chose, not image content). Then the
//! requests the block device would make: reads, writes, WRITE_ZEROES, DISCARD, FLUSH — whole
//! sectors inside the disk, never writes on a read-only disk, as the device guarantees.
//!
//! Checked: no panic, no hang (libFuzzer's -timeout), no absurd allocation (-malloc_limit_mb);
//! the disk size is a whole number of sectors; a read-only image is left as it was, and no other
//! file appears. Not checked: that data reads back. A corrupt image
//! whose refcounts call its own metadata free gets that metadata overwritten by new clusters
//! (`imago` has no overlap check like qemu's), which corrupts the image further but touches no
//! other file.

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
        match req.kind {
            kind::READ => {
                let _ = disk.read_at(&mut vec![0u8; len], offset);
            }
            kind::WRITE => {
                let _ = disk.write_at(&vec![req.fill; len], offset);
            }
            kind::WRITE_ZEROES | kind::WRITE_ZEROES_UNMAP => {
                let unmap = req.kind == kind::WRITE_ZEROES_UNMAP;
                let _ = disk.write_zeroes(offset, len as u64, unmap);
            }
            kind::DISCARD => {
                let _ = disk.discard(offset, len as u64);
            }
            _ => {
                let _ = disk.flush();
            }
        }
    }
    drop(disk);
    if case.readonly {
        let after = std::fs::read(&path).expect("reading the image back");
        assert!(after == case.image, "a read-only image was modified");
    }
    let files = std::fs::read_dir(dir.path()).expect("scratch dir").count();
    assert_eq!(files, 1, "files appeared next to the image");
});
