//! A private directory per run for image files and sockets, on tmpfs when there is one (the
//! targets write a file every run; a disk would make that the bottleneck).

use std::path::PathBuf;

fn base() -> PathBuf {
    if let Some(dir) = std::env::var_os("HYPERPOOL_FUZZ_TMP") {
        return dir.into();
    }
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// A fresh directory, removed with everything in it when dropped.
pub fn dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hyperpool-fuzz-")
        .tempdir_in(base())
        .expect("cannot create a scratch directory (set HYPERPOOL_FUZZ_TMP)")
}
