//! The project's Debian guest (stock kernel + busybox initramfs, `hyperpool guest debian`), built
//! once per test binary into `HYPERPOOL_DEBIAN_DIR` (scripts/test.sh builds it up front).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::hyperpool;

/// The guest's directory, or None when it cannot be had here (a failure under CI=true). Built
/// once per test binary: its tests run in parallel and must not build it twice at once.
pub fn debian_guest() -> Option<PathBuf> {
    static GUEST: OnceLock<Option<PathBuf>> = OnceLock::new();
    GUEST.get_or_init(build).clone()
}

fn build() -> Option<PathBuf> {
    let dir = std::env::var_os("HYPERPOOL_DEBIAN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debian-guest"));
    let complete = ["vmlinux", "vmlinuz", "initramfs.cpio.gz", "tools.cpio.gz"]
        .iter()
        .all(|f| dir.join(f).exists());
    if !complete {
        let out = Command::new(hyperpool())
            .args(["guest", "debian"])
            .arg(&dir)
            .output()
            .unwrap();
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "cannot build the Debian guest in CI: {why}"
            );
            eprintln!("skipping: cannot build the Debian guest: {why}");
            return None;
        }
    }
    Some(dir)
}
