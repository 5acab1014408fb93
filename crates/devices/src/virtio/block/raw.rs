//! Raw disk images: the file is the disk, byte for byte. Writable images are locked with
//! `flock(LOCK_EX | LOCK_NB)` and read-only ones with `LOCK_SH`, so two VMs cannot both write an
//! image (or one write what another reads); the lock goes with the file descriptor.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::backend::DiskBackend;
use super::request::SECTOR_SIZE;

/// Zeroes are written in chunks of this size when the filesystem cannot `fallocate` them.
const ZERO_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {}: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {} is locked by another process (another VM using it?)", .path.display())]
    Locked { path: PathBuf },
    #[error("disk image {}: cannot lock: {source}", .path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("disk image {} is not a regular file or block device", .path.display())]
    NotAFile { path: PathBuf },
    #[error("disk image {} is smaller than one 512-byte sector", .path.display())]
    Empty { path: PathBuf },
}

/// Opens `path` (read-write unless `readonly`), checks it is a regular file or block device, and
/// locks it with `flock(LOCK_NB)`: exclusive when writable, shared when read-only. Used for raw
/// images and for qcow2 images (and their backing files) alike.
pub(super) fn open_locked(path: &Path, readonly: bool) -> Result<File, DiskError> {
    let open_err = |source| DiskError::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(open_err)?;
    let ft = file.metadata().map_err(open_err)?.file_type();
    {
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_file() && !ft.is_block_device() {
            return Err(DiskError::NotAFile {
                path: path.to_owned(),
            });
        }
    }
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            DiskError::Locked {
                path: path.to_owned(),
            }
        } else {
            DiskError::Lock {
                path: path.to_owned(),
                source: e,
            }
        });
    }
    Ok(file)
}

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens and locks `path`; its size (rounded down to whole sectors) is the disk's.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let mut file = open_locked(path, readonly)?;
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        // Seeking to the end also sizes block devices (whose metadata length is 0).
        let len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        let size = len - len % SECTOR_SIZE;
        if size == 0 {
            return Err(DiskError::Empty {
                path: path.to_owned(),
            });
        }
        if size != len {
            tracing::warn!(
                "disk image {}: the last {} bytes are not a whole sector and are not visible",
                path.display(),
                len - size
            );
        }
        Ok(Self { file, size })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a file descriptor we own; no memory is involved.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_zeroes_slowly(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// The filesystem does not do this kind of `fallocate`.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is a hint: a filesystem without holes keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if unsupported(&e) => self.write_zeroes_slowly(offset, len),
            r => r,
        }
    }

    fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
}
