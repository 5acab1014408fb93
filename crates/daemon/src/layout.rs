//! Where the daemon keeps things: `<state>/state.redb`, and per VM `<state>/vms/<name>/` with
//! its API socket, console socket and log, VMM log and disk overlays.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    pub state_dir: PathBuf,
}

impl Layout {
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("state.redb")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("daemon.lock")
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("vms").join(name)
    }

    pub fn api_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("api.sock")
    }

    pub fn console_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.sock")
    }

    pub fn console_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.log")
    }

    pub fn vmm_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vmm.log")
    }

    pub fn overlay(&self, name: &str, index: usize) -> PathBuf {
        self.vm_dir(name).join(format!("disk{index}.qcow2"))
    }
}

/// Unix socket paths are limited to 107 bytes; a state dir deep enough to break that is refused
/// up front instead of failing at the first VM start.
pub fn check_socket_room(layout: &Layout) -> Result<(), String> {
    let longest = layout.console_socket(&"x".repeat(crate::spec::MAX_NAME));
    if longest.as_os_str().len() > 107 {
        return Err(format!(
            "--state-dir {}: too deep for Unix socket paths (VM sockets would be {} bytes, the limit is 107)",
            layout.state_dir.display(),
            longest.as_os_str().len()
        ));
    }
    Ok(())
}

/// Creates `<state>/vms` and marks it as the top of directory hierarchies (`chattr +T`), so
/// that ext4's Orlov allocator spreads the VM directories over its block groups: the files of
/// a VM then come from its own directory's group. Without the mark every VM's files came from
/// one group, and on ext4 without a journal each new inode there is found by walking past every
/// inode freed in the last minute (`recently_deleted()`): in the pool benchmark that walk cost
/// each VM about 2 ms of its VMM's CPU and 2.5 ms of the daemon's. Filesystems without the
/// flag just keep the directory as it is.
pub fn create_vms_dir(layout: &Layout) -> std::io::Result<()> {
    let dir = layout.state_dir.join("vms");
    std::fs::create_dir_all(&dir)?;
    let mark = std::fs::File::open(&dir).and_then(|d| {
        use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
        let flags = ioctl_getflags(&d)?;
        if !flags.contains(IFlags::TOPDIR) {
            ioctl_setflags(&d, flags | IFlags::TOPDIR)?;
        }
        Ok(())
    });
    if let Err(e) = mark {
        use rustix::io::Errno;
        // No inode flags (tmpfs) or not this one (btrfs, XFS): nothing to gain there.
        let unsupported = [Errno::NOTTY, Errno::OPNOTSUPP, Errno::INVAL]
            .iter()
            .any(|n| e.raw_os_error() == Some(n.raw_os_error()));
        if unsupported {
            tracing::debug!("{}: not marked as a top directory: {e}", dir.display());
        } else {
            tracing::warn!(
                "{}: not marked as a top directory ({e}); on ext4 VM starts cost more",
                dir.display()
            );
        }
    }
    Ok(())
}

pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vms_dir_is_a_top_directory_where_the_filesystem_has_the_flag() {
        let state = tempfile::tempdir().unwrap();
        let layout = Layout {
            state_dir: state.path().join("state"),
        };
        create_vms_dir(&layout).unwrap();
        // Again on an existing directory: no error, the mark stays.
        create_vms_dir(&layout).unwrap();
        let dir = std::fs::File::open(layout.state_dir.join("vms")).unwrap();
        // Only ext2/3/4 have the flag (btrfs and XFS refuse it, tmpfs keeps no flags at all).
        const EXT4_SUPER_MAGIC: i64 = 0xef53;
        let fs = rustix::fs::fstatfs(&dir).unwrap();
        if fs.f_type as i64 == EXT4_SUPER_MAGIC {
            let flags = rustix::fs::ioctl_getflags(&dir).unwrap();
            assert!(flags.contains(rustix::fs::IFlags::TOPDIR), "{flags:?}");
        } else {
            eprintln!("not ext4 here (f_type {:#x}): nothing to check", fs.f_type);
        }
    }
}
