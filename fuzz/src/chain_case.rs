//! The input of `virtio_chain`: where one split queue lives, where the device left off, and
//! guest memory.
//!
//! | bytes  | field                                                           |
//! |--------|-----------------------------------------------------------------|
//! | 0      | queue size, log2 (modulo 9)                                     |
//! | 1      | bit 0: EVENT_IDX negotiated                                     |
//! | 2..6   | descriptor table address (modulo the memory span, 16-aligned)   |
//! | 6..10  | avail ring address (2-aligned)                                  |
//! | 10..14 | used ring address (4-aligned)                                   |
//! | 14..16 | next avail index the device expects                            |
//! | 16..18 | next used index                                                 |
//! | 18..   | guest memory                                                    |

use crate::input::{Reader, Writer};
use crate::memory::SPAN;

pub struct ChainCase<'a> {
    pub queue_size: u16,
    pub event_idx: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub image: &'a [u8],
}

impl<'a> ChainCase<'a> {
    pub fn decode(data: &'a [u8]) -> Self {
        let mut r = Reader::new(data);
        let queue_size = 1 << (r.u8() % 9);
        let event_idx = r.u8() & 1 != 0;
        let mut addr = |align: u64| (u64::from(r.u32()) % SPAN) & !(align - 1);
        let (desc, avail, used) = (addr(16), addr(2), addr(4));
        Self {
            queue_size,
            event_idx,
            desc,
            avail,
            used,
            next_avail: r.u16(),
            next_used: r.u16(),
            image: r.rest(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.queue_size.trailing_zeros() as u8)
            .u8(self.event_idx.into())
            .u32(self.desc as u32)
            .u32(self.avail as u32)
            .u32(self.used as u32)
            .u16(self.next_avail)
            .u16(self.next_used)
            .bytes(self.image);
        w.0
    }
}
