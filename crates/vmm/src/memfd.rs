//! An anonymous memory file (memfd): guest RAM another process can map by its fd.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// A memfd of `size` bytes (sparse: pages are allocated as they are touched), close-on-exec,
/// sealed at that size: the backends that map it cannot shrink it under us (a SIGBUS in the
/// VMM) nor grow it, and nobody can lift the seals.
pub(crate) fn create(name: &str, size: u64) -> io::Result<File> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal bits.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn a_memfd_has_its_size_and_keeps_what_is_written() {
        let mut f = super::create("hp-test", 1 << 20).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"shared").unwrap();
        let mut back = [0u8; 6];
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"shared");
        assert!(super::create("bad\0name", 1).is_err());
        // Sealed: neither shrinking nor growing.
        assert!(f.set_len(4096).is_err());
        assert!(f.set_len(2 << 20).is_err());
    }
}
