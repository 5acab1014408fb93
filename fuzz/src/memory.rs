//! Guest memory for the targets: two regions with a hole between them (so a buffer may run off
//! a region's end into nothing), filled from the fuzz input.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `(start, length)` of each region; the input fills them in order.
pub const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x1_1000, 0x8000)];
/// One past the last guest address (fuzzed addresses are taken modulo this).
pub const SPAN: u64 = REGIONS[1].0 + REGIONS[1].1 as u64;

/// Guest memory holding `image` (the first region's bytes, then the second's; the rest zero).
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let ranges = REGIONS.map(|(start, len)| (GuestAddress(start), len));
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let mut rest = image;
    for (start, len) in REGIONS {
        let n = len.min(rest.len());
        mem.write_slice(&rest[..n], GuestAddress(start))
            .expect("filling guest memory");
        rest = &rest[n..];
    }
    mem
}

/// Every byte of guest memory, region after region.
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(REGIONS.iter().map(|r| r.1).sum());
    for (start, len) in REGIONS {
        let at = out.len();
        out.resize(at + len, 0);
        mem.read_slice(&mut out[at..], GuestAddress(start))
            .expect("reading guest memory");
    }
    out
}

/// The bytes a device may write: checked against a [`snapshot`] taken before it ran.
pub struct Writable(Vec<bool>);

impl Default for Writable {
    fn default() -> Self {
        Self(vec![false; REGIONS.iter().map(|r| r.1).sum()])
    }
}

impl Writable {
    /// Allows `[addr, addr + len)` (the parts of it that are memory).
    pub fn allow(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        let mut base = 0usize;
        for (start, rlen) in REGIONS {
            let (lo, hi) = (addr.max(start), end.min(start + rlen as u64));
            if lo < hi {
                let at = base + (lo - start) as usize;
                self.0[at..at + (hi - lo) as usize].fill(true);
            }
            base += rlen;
        }
    }

    /// Panics at the first byte that changed from `before` to `after` without being allowed.
    pub fn check(&self, before: &[u8], after: &[u8]) {
        // Page by page: a byte loop over all of memory would cost more than the code under test
        // (coverage instrumentation traces every comparison).
        const PAGE: usize = 4096;
        for (p, (b, a)) in before.chunks(PAGE).zip(after.chunks(PAGE)).enumerate() {
            if b == a {
                continue;
            }
            for (i, (x, y)) in b.iter().zip(a).enumerate() {
                let at = p * PAGE + i;
                assert!(
                    x == y || self.0[at],
                    "guest memory byte {at:#x} (of the regions' concatenation) was written \
                     outside every device-writable buffer and the used ring"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_checked_in_both_regions() {
        let mem = guest_memory(&[1, 2, 3]);
        let before = snapshot(&mem);
        assert_eq!(before[..4], [1, 2, 3, 0]);
        let mut w = Writable::default();
        // Runs off region 0 into the hole and on into region 1.
        w.allow(0xfff0, 0x1020);
        mem.write_slice(&[9; 16], GuestAddress(0xfff0)).unwrap();
        mem.write_slice(&[9; 16], GuestAddress(0x1_1000)).unwrap();
        w.check(&before, &snapshot(&mem));
        mem.write_obj(7u8, GuestAddress(0x1_1010)).unwrap();
        let after = snapshot(&mem);
        let caught = std::panic::catch_unwind(|| w.check(&before, &after));
        assert!(
            caught.is_err(),
            "a write past the allowed range went unnoticed"
        );
    }
}
