//! Opening the VM's disks: every image is opened and locked before any device exists, so bad
//! input (missing or locked image, corrupt or unsupported qcow2, missing backing file, duplicate
//! ids) stops the VM before the guest starts. The format is `format=` or else comes from the
//! file (qcow2 if it starts with the qcow2 magic, else raw). A detected qcow2 image may not name
//! a backing file: a guest can write any header into a raw disk it owns, and a backing file is a
//! path on the host — so following one takes the user's explicit `format=qcow2`.

use std::collections::HashSet;
use std::sync::Arc;

use hyperpool_devices::virtio::Block;
use hyperpool_devices::virtio::block::{Qcow2File, qcow2, serial_for};

use crate::config::{DiskConfig, DiskFormat};
use crate::error::{Error, Result};
use crate::vhost_user::Opened;

pub(crate) fn open_all(disks: &[DiskConfig]) -> Result<Vec<Opened>> {
    let mut ids = HashSet::new();
    for d in disks {
        if let Some(id) = &d.id {
            if !ids.insert(id.as_str()) {
                return Err(Error::Config(format!(
                    "--disk: id '{id}' is used by more than one disk"
                )));
            }
        }
    }
    disks.iter().map(open).collect()
}

/// Opens (and locks) one disk image, or connects its vhost-user backend; the error is one line
/// naming it.
pub(crate) fn open(d: &DiskConfig) -> Result<Opened> {
    if let Some(vu) = &d.vhost_user {
        return crate::vhost_user::open_disk(d, vu);
    }
    let block = open_image(d)?;
    let counters = block.counters();
    Ok((Box::new(block), counters))
}

/// Opens (and locks) a disk image as a virtio-blk device model (also what `hyperpool device blk`
/// serves out of process).
pub fn open_image(d: &DiskConfig) -> Result<Block> {
    let is_qcow2 = match d.format {
        Some(DiskFormat::Qcow2) => true,
        Some(DiskFormat::Raw) => false,
        None if qcow2::is_qcow2(&d.path) => {
            if qcow2::names_backing_file(&d.path) {
                return Err(Error::Config(format!(
                    "--disk: {} is a qcow2 image with a backing file; add format=qcow2 to use it (a detected format never follows a backing file)",
                    d.path.display()
                )));
            }
            true
        }
        None => false,
    };
    if is_qcow2 {
        let image = Qcow2File::open(&d.path, d.readonly)
            .map_err(|e| Error::Config(format!("--disk: {e}")))?;
        return Ok(Block::new(
            Arc::new(image),
            d.readonly,
            d.num_queues,
            serial_for(&d.path, d.id.as_deref()),
        ));
    }
    Block::open_raw(&d.path, d.readonly, d.num_queues, d.id.as_deref())
        .map_err(|e| Error::Config(format!("--disk: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &std::path::Path, id: Option<&str>) -> DiskConfig {
        DiskConfig {
            path: path.to_owned(),
            readonly: true,
            num_queues: 1,
            id: id.map(str::to_owned),
            format: None,
            vhost_user: None,
        }
    }

    #[test]
    fn bad_disks_are_config_errors() {
        let img = std::env::temp_dir().join(format!("hp-disk-test-{}", std::process::id()));
        std::fs::write(&img, [0u8; 4096]).unwrap();
        assert_eq!(
            open_all(&[disk(&img, Some("a")), disk(&img, Some("b"))])
                .unwrap()
                .len(),
            2
        );
        let e = open_all(&[disk(&img, Some("a")), disk(&img, Some("a"))])
            .err()
            .unwrap();
        assert!(e.is_user_error() && e.to_string().contains("id 'a'"), "{e}");
        let missing = img.with_extension("missing");
        let e = open_all(&[disk(&missing, None)]).err().unwrap();
        assert!(e.is_user_error(), "{e}");
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        std::fs::remove_file(&img).unwrap();
    }

    #[test]
    fn qcow2_is_detected_by_its_magic() {
        let img = std::env::temp_dir().join(format!("hp-disk-qcow2-{}", std::process::id()));
        let mut bytes = b"QFI\xfb\0\0\0\x03".to_vec();
        bytes.resize(4096, 0);
        std::fs::write(&img, &bytes).unwrap();
        let e = open_all(&[disk(&img, None)]).err().unwrap();
        assert!(e.is_user_error(), "{e}");
        assert!(e.to_string().contains("qcow2 image"), "{e}");
        assert!(e.to_string().contains("corrupt header"), "{e}");
        std::fs::remove_file(&img).unwrap();
    }
}
