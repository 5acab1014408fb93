//! A virtio-blk request as the guest lays it out in a descriptor chain (virtio 1.2 §5.2.6):
//! a 16-byte header (type, reserved, sector) and any request data in device-readable
//! descriptors, then device-writable data, then the one-byte status as the last byte of the last
//! descriptor. Nothing here trusts the guest: every buffer is checked against guest memory, and a
//! request that is merely wrong (short header, data in the wrong direction) still gets a status.

use std::fmt;

use virtio_bindings::virtio_blk as b;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

pub const SECTOR_SIZE: u64 = 512;
pub const HEADER_LEN: u64 = 16;

/// One descriptor as read from the ring: not yet checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A buffer inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            b::VIRTIO_BLK_T_IN => Self::In,
            b::VIRTIO_BLK_T_OUT => Self::Out,
            b::VIRTIO_BLK_T_FLUSH => Self::Flush,
            b::VIRTIO_BLK_T_GET_ID => Self::GetId,
            b::VIRTIO_BLK_T_DISCARD => Self::Discard,
            b::VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            t => Self::Other(t),
        }
    }
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Device-readable bytes after the header (OUT data, DISCARD/WRITE_ZEROES segments).
    pub readable: Vec<Segment>,
    /// Device-writable bytes before the status byte (IN data, GET_ID).
    pub writable: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a request.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Nowhere to put a status, or a buffer outside guest memory: the queue is broken.
    Broken(String),
    /// A request that gets status IOERR at `status`.
    Invalid { status: GuestAddress, why: String },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Broken(why) => f.write_str(why),
            Self::Invalid { why, .. } => f.write_str(why),
        }
    }
}

/// Total length of `segs`.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// `segs` without their first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if n >= s.len {
            n -= s.len;
            continue;
        }
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + n),
            len: s.len - n,
        });
        n = 0;
    }
    out
}

/// Copies the first `buf.len()` bytes of `segs` into `buf`; false if they are shorter.
pub fn gather(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

impl Request {
    /// Bytes of data the request moves between disk and guest: what IN reads into, what OUT
    /// writes from; 0 for other types.
    pub fn data_len(&self) -> u64 {
        match self.kind {
            RequestType::In => total_len(&self.writable),
            RequestType::Out => total_len(&self.readable),
            _ => 0,
        }
    }

    /// Parses the descriptors of one chain, in order.
    pub fn parse(mem: &GuestMemoryMmap, descs: &[RawDesc]) -> Result<Self, ParseError> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut wrong_order = false;
        for d in descs {
            let addr = GuestAddress(d.addr);
            let len = d.len as usize;
            let perm = if d.write {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if len > 0
                && (addr.checked_add(d.len as u64).is_none()
                    || !GuestMemory::check_range(mem, addr, len, perm))
            {
                return Err(ParseError::Broken(format!(
                    "buffer {:#x}+{:#x} is outside guest memory",
                    d.addr, d.len
                )));
            }
            let seg = Segment {
                addr,
                len: u64::from(d.len),
            };
            if d.write {
                writable.push(seg);
            } else {
                wrong_order |= !writable.is_empty();
                readable.push(seg);
            }
        }
        let last = descs.last();
        let status = match last {
            Some(d) if d.write && d.len > 0 => GuestAddress(d.addr + u64::from(d.len) - 1),
            _ => {
                return Err(ParseError::Broken(
                    "request without a device-writable status byte at its end".into(),
                ));
            }
        };
        if let Some(s) = writable.last_mut() {
            s.len -= 1;
            if s.len == 0 {
                writable.pop();
            }
        }
        let invalid = |why: &str| ParseError::Invalid {
            status,
            why: why.into(),
        };
        if wrong_order {
            return Err(invalid("device-readable descriptor after a writable one"));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        if !gather(mem, &readable, &mut header) {
            return Err(invalid("request header shorter than 16 bytes"));
        }
        let kind = RequestType::from_raw(u32::from_le_bytes(header[0..4].try_into().unwrap()));
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        Ok(Self {
            kind,
            sector,
            readable: skip(&readable, HEADER_LEN),
            writable,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn d(addr: u64, len: u32, write: bool) -> RawDesc {
        RawDesc { addr, len, write }
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(at)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn header_data_status_in_separate_or_shared_descriptors() {
        let m = mem();
        header(&m, 0x100, b::VIRTIO_BLK_T_OUT, 7);
        let r = Request::parse(
            &m,
            &[
                d(0x100, 16, false),
                d(0x1000, 1024, false),
                d(0x200, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::Out);
        assert_eq!(r.sector, 7);
        assert_eq!(
            r.readable,
            vec![Segment {
                addr: GuestAddress(0x1000),
                len: 1024
            }]
        );
        assert!(r.writable.is_empty());
        assert_eq!(r.status, GuestAddress(0x200));
        // Header and data in one descriptor, data and status in one descriptor.
        header(&m, 0x300, b::VIRTIO_BLK_T_IN, 1);
        let r = Request::parse(&m, &[d(0x300, 16, false), d(0x2000, 513, true)]).unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(
            r.writable,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 512
            }]
        );
        assert_eq!(r.status, GuestAddress(0x2200));
        let r = Request::parse(&m, &[d(0x300, 16 + 512, false), d(0x200, 1, true)]).unwrap();
        assert_eq!(
            r.readable,
            vec![Segment {
                addr: GuestAddress(0x310),
                len: 512
            }]
        );
        // A header split over two descriptors.
        let r = Request::parse(
            &m,
            &[d(0x300, 8, false), d(0x308, 8, false), d(0x200, 1, true)],
        )
        .unwrap();
        assert_eq!((r.kind, r.sector), (RequestType::In, 1));
        assert!(r.readable.is_empty());
    }

    #[test]
    fn broken_and_invalid_chains() {
        let m = mem();
        header(&m, 0x100, b::VIRTIO_BLK_T_IN, 0);
        let broken =
            |descs: &[RawDesc]| matches!(Request::parse(&m, descs), Err(ParseError::Broken(_)));
        let invalid = |descs: &[RawDesc]| {
            matches!(Request::parse(&m, descs), Err(ParseError::Invalid { .. }))
        };
        assert!(broken(&[]));
        assert!(broken(&[d(0x100, 16, false)]));
        assert!(broken(&[d(0x100, 16, false), d(0x200, 0, true)]));
        assert!(broken(&[
            d(0x100, 16, false),
            d(0xfff0, 0x20, true),
            d(0x200, 1, true)
        ]));
        assert!(broken(&[d(u64::MAX - 4, 16, false), d(0x200, 1, true)]));
        assert!(broken(&[d(0x100, 16, false), d(0x10000, 1, true)]));
        assert!(invalid(&[d(0x100, 8, false), d(0x200, 1, true)]));
        assert!(invalid(&[d(0x200, 1, true)]));
        assert!(invalid(&[
            d(0x2000, 16, true),
            d(0x100, 16, false),
            d(0x200, 1, true)
        ]));
        // Zero-length descriptors anywhere are harmless.
        assert!(
            Request::parse(
                &m,
                &[
                    d(0, 0, false),
                    d(0x100, 16, false),
                    d(0xffff_0000, 0, true),
                    d(0x200, 1, true)
                ]
            )
            .is_ok()
        );
    }
}
