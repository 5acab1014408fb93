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

pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
