//! The input of `pci_config`: a sequence of 16-byte guest accesses.
//!
//! | byte | field                                                                   |
//! |------|-------------------------------------------------------------------------|
//! | 0    | kind (modulo 8, see [`kind`])                                           |
//! | 1    | access length code (see [`Op::access_len`])                            |
//! | 2    | slot (bits 0..2) and BAR index (bits 2.., modulo 6)                     |
//! | 3    | flags: bit 0 read (else write), bit 1 raw ECAM offset / 64-bit window   |
//! | 4..8 | offset                                                                  |
//! | 8..16| value written                                                           |

use crate::input::{Reader, Writer};

/// The most accesses one input makes.
pub const MAX_OPS: usize = 256;

pub mod kind {
    /// ECAM access to `slot`'s function 0 at `offset & 0xfff` (flag 1: raw ECAM offset).
    pub const ECAM: u8 = 0;
    /// A dword access to the 0xCF8 address register (written: `value`).
    pub const CF8: u8 = 1;
    /// An access to the 0xCFC data window at byte `offset & 3`.
    pub const CFC: u8 = 2;
    /// An MMIO access inside `slot`'s BAR at `offset` (modulo its size), wherever it now is.
    pub const BAR: u8 = 3;
    /// An MMIO access anywhere in a PCI window (flag 1: the 64-bit one) at `offset | value << 32`.
    pub const WINDOW: u8 = 4;
    /// BAR sizing as a guest does it: save, write all-ones, read the mask, restore.
    pub const BAR_PROBE: u8 = 5;
    /// The command register of `slot`: set to `value` (memory decoding on or off).
    pub const COMMAND: u8 = 6;
    /// Straight to the virtio device's BAR `bar` at `offset` (modulo its size), decoded or not:
    /// the transport's registers (BAR 0) whatever the guest did to the BARs.
    pub const VIRTIO: u8 = 7;
    pub const COUNT: u8 = 8;
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Op {
    pub kind: u8,
    pub len_code: u8,
    pub slot: u8,
    pub bar: u8,
    pub read: bool,
    pub wide: bool,
    pub offset: u32,
    pub value: u64,
}

impl Op {
    /// 1, 2, 4 or 8 bytes mostly; sometimes the odd sizes a guest can also produce.
    pub fn access_len(&self) -> usize {
        const LENS: [usize; 12] = [1, 2, 4, 8, 1, 2, 4, 8, 3, 5, 6, 7];
        LENS[usize::from(self.len_code) % LENS.len()]
    }

    /// The length code for an access of `len` bytes (1, 2, 4 or 8).
    pub fn code(len: usize) -> u8 {
        match len {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        }
    }

    pub fn decode(b: [u8; 16]) -> Self {
        let mut r = Reader::new(&b);
        let kind = r.u8() % kind::COUNT;
        let len_code = r.u8();
        let target = r.u8();
        let flags = r.u8();
        Self {
            kind,
            len_code,
            slot: target & 3,
            bar: (target >> 2) % 6,
            read: flags & 1 != 0,
            wide: flags & 2 != 0,
            offset: r.u32(),
            value: r.u64(),
        }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut w = Writer::default();
        w.u8(self.kind)
            .u8(self.len_code)
            .u8(self.slot | (self.bar << 2))
            .u8(u8::from(self.read) | (u8::from(self.wide) << 1))
            .u32(self.offset)
            .u64(self.value);
        w.0.try_into().expect("16 bytes")
    }
}

/// The accesses of one input.
pub fn decode(data: &[u8]) -> Vec<Op> {
    data.chunks(16)
        .take(MAX_OPS)
        .map(|c| {
            let mut b = [0u8; 16];
            b[..c.len()].copy_from_slice(c);
            Op::decode(b)
        })
        .collect()
}
