//! Opening the VM's disks: every image is opened and locked before any device exists, so bad
//! input (missing or locked image, duplicate ids) stops the VM before the guest starts.

use std::collections::HashSet;

use hyperpool_devices::virtio::Block;

use crate::config::DiskConfig;
use crate::error::{Error, Result};

pub(crate) fn open_all(disks: &[DiskConfig]) -> Result<Vec<Block>> {
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
    disks
        .iter()
        .map(|d| {
            Block::open_raw(&d.path, d.readonly, d.num_queues, d.id.as_deref())
                .map_err(|e| Error::Config(format!("--disk: {e}")))
        })
        .collect()
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
        let e = open_all(&[disk(&img, Some("a")), disk(&img, Some("a"))]).unwrap_err();
        assert!(e.is_user_error() && e.to_string().contains("id 'a'"), "{e}");
        let missing = img.with_extension("missing");
        let e = open_all(&[disk(&missing, None)]).unwrap_err();
        assert!(e.is_user_error(), "{e}");
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        std::fs::remove_file(&img).unwrap();
    }
}
