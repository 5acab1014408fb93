//! The input of the device targets (virtio-blk, -net, -vsock): a 16-byte header, then guest
//! memory. The rings sit at fixed places ([`crate::rig::rings`]) inside that memory, so what the
//! fuzzer varies is what a guest controls: descriptors, avail ring, buffers and their contents.
//!
//! | bytes  | field                                                    |
//! |--------|----------------------------------------------------------|
//! | 0      | queue size, log2 (modulo 9: 1..=256 entries)             |
//! | 1      | queues to kick, one bit per queue index                  |
//! | 2..10  | features the driver wants (of what the device offers)    |
//! | 10..16 | device-specific (see each target)                        |
//! | 16..   | guest memory ([`crate::memory::guest_memory`])           |

use crate::input::{Reader, Writer};

pub struct DeviceCase<'a> {
    pub queue_size: u16,
    pub kick: u8,
    pub features: u64,
    pub extra: [u8; 6],
    pub image: &'a [u8],
}

impl<'a> DeviceCase<'a> {
    pub fn decode(data: &'a [u8]) -> Self {
        let mut r = Reader::new(data);
        Self {
            queue_size: 1 << (r.u8() % 9),
            kick: r.u8(),
            features: r.u64(),
            extra: r.bytes(),
            image: r.rest(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.queue_size.trailing_zeros() as u8)
            .u8(self.kick)
            .u64(self.features)
            .bytes(&self.extra)
            .bytes(self.image);
        w.0
    }
}

/// Lays out guest memory for seeds: descriptors and avail entries in a ring slot, buffers.
#[derive(Default)]
pub struct Image(pub Vec<u8>);

impl Image {
    /// Writes `bytes` at guest address `addr` (below the first region's end).
    pub fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let end = addr as usize + bytes.len();
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[addr as usize..end].copy_from_slice(bytes);
        self
    }

    /// Descriptor `index` of the queue in ring slot `slot`.
    pub fn desc(&mut self, slot: usize, index: u16, d: (u64, u32, u16, u16)) -> &mut Self {
        let (addr, len, flags, next) = d;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.put(crate::rig::rings(slot).0 + 16 * u64::from(index), &b)
    }

    /// A chain of `(addr, len, device_writable)` buffers from descriptor `first` on.
    pub fn chain(&mut self, slot: usize, first: u16, bufs: &[(u64, u32, bool)]) -> &mut Self {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = i as u16;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if usize::from(i) + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.desc(slot, first + i, (addr, len, flags, first + i + 1));
        }
        self
    }

    /// The avail ring of slot `slot`: these heads, and the index after them.
    pub fn avail(&mut self, slot: usize, heads: &[u16]) -> &mut Self {
        let at = crate::rig::rings(slot).1;
        let mut b = vec![0u8; 4];
        b[2..4].copy_from_slice(&(heads.len() as u16).to_le_bytes());
        for h in heads {
            b.extend_from_slice(&h.to_le_bytes());
        }
        self.put(at, &b)
    }
}

pub const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
pub const VRING_DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
