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

/// Where guest address `addr` sits in a [`snapshot`], if it is memory.
pub fn index_of(addr: u64) -> Option<usize> {
    let mut base = 0usize;
    for (start, len) in REGIONS {
        if let Some(off) = addr.checked_sub(start).filter(|o| *o < len as u64) {
            return Some(base + off as usize);
        }
        base += len;
    }
    None
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
        for a in addr..addr.saturating_add(len).min(SPAN) {
            if let Some(i) = index_of(a) {
                self.0[i] = true;
            }
        }
    }

    /// Panics at the first byte that changed from `before` to `after` without being allowed.
    pub fn check(&self, before: &[u8], after: &[u8]) {
        for (i, (b, a)) in before.iter().zip(after).enumerate() {
            assert!(
                b == a || self.0[i],
                "guest memory byte {i:#x} (of the regions' concatenation) was written outside \
                 every device-writable buffer and the used ring"
            );
        }
    }
}
