//! The input of `qcow2_image`: how the image is opened, a few I/O requests, then the image file.
//!
//! | bytes     | field                                                               |
//! |-----------|---------------------------------------------------------------------|
//! | 0         | bit 0: read-only; bit 1: `format=qcow2` given (a backing file named |
//! |           | in the header is followed) — else the format was detected          |
//! | 1         | number of requests (modulo [`MAX_OPS`] + 1)                         |
//! | 2..       | the requests, 12 bytes each (see [`Req`])                           |
//! | then      | the image file                                                      |

use crate::input::{Reader, Writer};

pub const MAX_OPS: u8 = 16;
/// The longest request, in sectors (the device splits nothing: it hands the backend whole
/// requests, but the fuzzer gains nothing from huge ones).
pub const MAX_SECTORS: u64 = 128;

pub mod kind {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const WRITE_ZEROES: u8 = 2;
    pub const WRITE_ZEROES_UNMAP: u8 = 3;
    pub const DISCARD: u8 = 4;
    pub const FLUSH: u8 = 5;
    pub const COUNT: u8 = 6;
}

/// One request: kind (modulo [`kind::COUNT`]), length in sectors (modulo [`MAX_SECTORS`] + 1),
/// a fill byte for writes, a pad byte, and the first sector (modulo the disk's).
#[derive(Clone, Copy, Debug)]
pub struct Req {
    pub kind: u8,
    pub sectors: u8,
    pub fill: u8,
    pub sector: u64,
}

pub struct Qcow2Case<'a> {
    pub readonly: bool,
    pub explicit_format: bool,
    pub reqs: Vec<Req>,
    pub image: &'a [u8],
}

impl<'a> Qcow2Case<'a> {
    pub fn decode(data: &'a [u8]) -> Self {
        let mut r = Reader::new(data);
        let flags = r.u8();
        let n = r.u8() % (MAX_OPS + 1);
        let reqs = (0..n)
            .map(|_| {
                let kind = r.u8() % kind::COUNT;
                let sectors = r.u8();
                let fill = r.u8();
                let _pad = r.u8();
                Req {
                    kind,
                    sectors,
                    fill,
                    sector: r.u64(),
                }
            })
            .collect();
        Self {
            readonly: flags & 1 != 0,
            explicit_format: flags & 2 != 0,
            reqs,
            image: r.rest(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(u8::from(self.readonly) | u8::from(self.explicit_format) << 1)
            .u8(self.reqs.len() as u8);
        for q in &self.reqs {
            w.u8(q.kind).u8(q.sectors).u8(q.fill).u8(0).u64(q.sector);
        }
        w.bytes(self.image);
        w.0
    }
}
