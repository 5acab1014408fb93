//! What the block device needs from a disk image. Offsets and lengths are in bytes and have been
//! checked against [`DiskBackend::size`] by the caller.

use std::io;
use std::os::fd::BorrowedFd;

pub trait DiskBackend: Send + Sync {
    /// The guest-visible size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn flush(&self) -> io::Result<()>;
    /// The guest no longer needs `len` bytes at `offset`; what they read afterwards is
    /// unspecified.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// `len` bytes at `offset` read as zeroes afterwards; `may_unmap` lets the backend free them.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
    /// The file whose bytes are the disk's at the same offsets, when reads, writes and
    /// `fdatasync` may go straight to it (the io_uring path); None when the format maps offsets
    /// or keeps state of its own (qcow2).
    fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}
