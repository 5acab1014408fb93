//! A request's guest buffers as host `iovec`s, for vectored I/O straight into guest memory.
//!
//! Every `iovec` comes from vm-memory's checked slice API (`GuestMemory::get_slices`), so it lies
//! inside a mapped guest memory region; a buffer that spans two regions becomes two `iovec`s.
//! The pointers stay valid only while the `GuestMemoryMmap` they came from is alive: whoever
//! hands them to the kernel must keep that memory (an `Arc` of it) until the I/O has completed.

use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions};

use super::request::Segment;

/// The most `iovec`s one `readv`/`writev` takes (Linux's `UIO_MAXIOV`); longer lists are done
/// in several steps.
pub const IOV_MAX: usize = 1024;

/// `iovec`s pointing into guest memory, laid out as the kernel reads them.
#[derive(Debug, Default)]
pub struct Iovecs(Vec<libc::iovec>);

// SAFETY: an `iovec` is an address and a length. These point into guest memory, which every
// thread of the VMM may access (`GuestMemoryMmap` is `Send + Sync`), and nothing here
// dereferences them: only the kernel does, during I/O that the owner of the memory waits for.
unsafe impl Send for Iovecs {}

impl Iovecs {
    pub fn as_ptr(&self) -> *const libc::iovec {
        self.0.as_ptr()
    }

    /// How many `iovec`s (at most [`IOV_MAX`] when filled by [`GuestIovecs::remainder`]).
    pub fn count(&self) -> u32 {
        self.0.len() as u32
    }
}

/// A request's data buffers in guest memory, in order.
#[derive(Debug, Default)]
pub struct GuestIovecs {
    iovecs: Iovecs,
    len: u64,
}

impl GuestIovecs {
    /// The host addresses of `segs`, which the device writes into (`device_writes`, an IN
    /// request) or reads from. None if any byte is outside guest memory.
    pub fn new(mem: &GuestMemoryMmap, segs: &[Segment], device_writes: bool) -> Option<Self> {
        let perm = if device_writes {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut iovecs = Vec::with_capacity(segs.len());
        let mut len = 0u64;
        for seg in segs {
            let count = usize::try_from(seg.len).ok()?;
            if count == 0 {
                continue;
            }
            let mut got = 0usize;
            for slice in GuestMemory::get_slices(mem, seg.addr, count, perm).ok()? {
                let slice = slice.ok()?;
                // `ptr_guard_mut` is the accessor for memory the device will write (it exists for
                // dirty-page tracking); both give the slice's start inside the region's mapping.
                let base = if device_writes {
                    slice.ptr_guard_mut().as_ptr()
                } else {
                    slice.ptr_guard().as_ptr().cast_mut()
                };
                iovecs.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: slice.len(),
                });
                got += slice.len();
            }
            if got != count {
                return None;
            }
            len += seg.len;
        }
        Some(Self {
            iovecs: Iovecs(iovecs),
            len,
        })
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Puts into `out` the `iovec`s for the bytes after the first `skip` (at most [`IOV_MAX`] of
    /// them): what is left after a short transfer, or after the first [`IOV_MAX`] `iovec`s.
    pub fn remainder(&self, skip: u64, out: &mut Iovecs) {
        let out = &mut out.0;
        out.clear();
        let mut skip = skip;
        for iov in &self.iovecs.0 {
            if out.len() == IOV_MAX {
                break;
            }
            let len = iov.iov_len as u64;
            if skip >= len {
                skip -= len;
                continue;
            }
            out.push(libc::iovec {
                // `skip < iov_len`, so this stays inside the same checked slice.
                iov_base: iov.iov_base.cast::<u8>().wrapping_add(skip as usize).cast(),
                iov_len: (len - skip) as usize,
            });
            skip = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use super::*;

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn buffers_map_into_guest_memory_and_split_at_regions() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x2000), 0x2000),
        ])
        .unwrap();
        let base = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap();
        let v = GuestIovecs::new(
            &mem,
            &[seg(0x100, 0x10), seg(0, 0), seg(0x1f00, 0x200)],
            true,
        )
        .unwrap();
        assert_eq!(v.len(), 0x210);
        let got: Vec<_> = v
            .iovecs
            .0
            .iter()
            .map(|i| (i.iov_base.cast::<u8>(), i.iov_len))
            .collect();
        assert_eq!(
            got,
            vec![
                (base(0x100), 0x10),
                (base(0x1f00), 0x100),
                (base(0x2000), 0x100)
            ]
        );
        // Outside guest memory, or past its end: refused.
        assert!(GuestIovecs::new(&mem, &[seg(0x3f00, 0x200)], false).is_none());
        assert!(GuestIovecs::new(&mem, &[seg(0x4000, 1)], false).is_none());
        assert!(GuestIovecs::new(&mem, &[seg(u64::MAX, 2)], false).is_none());
    }

    #[test]
    fn remainder_skips_done_bytes_and_caps_the_count() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap();
        let segs: Vec<_> = (0..IOV_MAX as u64 + 6).map(|i| seg(i * 16, 8)).collect();
        let v = GuestIovecs::new(&mem, &segs, false).unwrap();
        let mut out = Iovecs::default();
        v.remainder(0, &mut out);
        assert_eq!(out.count() as usize, IOV_MAX);
        // Part way into the third buffer.
        v.remainder(19, &mut out);
        assert_eq!(out.count() as usize, IOV_MAX);
        assert_eq!(out.0[0].iov_base.cast::<u8>(), base.wrapping_add(32 + 3));
        assert_eq!(out.0[0].iov_len, 5);
        assert_eq!(out.0[1].iov_base.cast::<u8>(), base.wrapping_add(48));
        // The tail after the first IOV_MAX buffers.
        v.remainder(8 * IOV_MAX as u64, &mut out);
        assert_eq!(out.count(), 6);
        v.remainder(v.len(), &mut out);
        assert_eq!(out.count(), 0);
    }
}
