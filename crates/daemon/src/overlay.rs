//! A VM's own copy-on-write disk on a shared base image: a qcow2 overlay whose backing file is
//! the base, made by qemu-img (the field's tool for it), so a new VM costs no copy.

use std::path::Path;
use std::process::Command;

/// Creates `overlay` backed by `base` (format detected: qcow2 magic, else raw).
pub fn create(base: &Path, overlay: &Path) -> Result<(), String> {
    let base = base
        .canonicalize()
        .map_err(|e| format!("base image {}: {e}", base.display()))?;
    let mut magic = [0u8; 4];
    let format = match std::fs::File::open(&base)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
    {
        Ok(()) if &magic == b"QFI\xfb" => "qcow2",
        Ok(()) => "raw",
        Err(e) => return Err(format!("base image {}: {e}", base.display())),
    };
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(&base)
        .arg(overlay)
        .output()
        .map_err(|e| format!("running qemu-img (install qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img could not create {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
