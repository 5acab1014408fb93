//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and moving packets between descriptor
//! chains and host buffers.
//!
//! Everything here reads what the guest wrote, so every length and address is checked: a bad
//! header is a [`PacketError`] (the packet is dropped, maybe answered with RST); a descriptor
//! outside guest memory or a malformed chain is a [`ChainError`] (the queue is broken).

use std::fmt;

use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::virtio::chain::{ChainError, Desc};

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The largest payload accepted from or sent to the guest in one packet (Linux's own limit).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// The only socket type offered.
pub const TYPE_STREAM: u16 = 1;
/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a SHUTDOWN: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet the guest sent that cannot be used (it is dropped; the caller may answer RST).
#[derive(Debug, PartialEq, Eq)]
pub enum PacketError {
    /// Fewer than [`HDR_LEN`] readable bytes.
    ShortHeader,
    /// A device-writable descriptor in a TX chain.
    WritableDescriptor,
    /// `len` over [`MAX_PKT_DATA`].
    TooLong(u32),
    /// `len` beyond the bytes the chain holds.
    Truncated { len: u32, have: u64 },
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShortHeader => write!(f, "shorter than a header"),
            Self::WritableDescriptor => write!(f, "device-writable descriptor in a TX chain"),
            Self::TooLong(len) => write!(f, "payload of {len} bytes is over {MAX_PKT_DATA}"),
            Self::Truncated { len, have } => {
                write!(f, "payload of {len} bytes but the chain holds {have}")
            }
        }
    }
}

/// Copies `out.len()` bytes starting `skip` bytes into the chain's readable descriptors.
fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), ChainError> {
    let mut done = 0usize;
    for d in descs {
        if done == out.len() {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        let bad = || ChainError::BadBuffer {
            addr: d.addr.0,
            len: d.len,
        };
        let at = d.addr.checked_add(skip).ok_or_else(bad)?;
        mem.read_slice(&mut out[done..done + n], at)
            .map_err(|_| bad())?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// A parsed TX packet, or why it is dropped (with its header when it had one).
pub type TxPacket = Result<(Header, Vec<u8>), (Option<Header>, PacketError)>;

/// A TX chain as header and payload. The outer error breaks the queue; the inner one only
/// drops the packet (the header, when there is one, is returned so the caller can answer RST).
pub fn read_tx(mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<TxPacket, ChainError> {
    if descs.iter().any(|d| d.write_only) {
        return Ok(Err((None, PacketError::WritableDescriptor)));
    }
    let have: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    if have < HDR_LEN as u64 {
        return Ok(Err((None, PacketError::ShortHeader)));
    }
    let mut raw = [0u8; HDR_LEN];
    gather(mem, descs, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len > MAX_PKT_DATA {
        return Ok(Err((Some(hdr), PacketError::TooLong(hdr.len))));
    }
    let payload = have - HDR_LEN as u64;
    if u64::from(hdr.len) > payload {
        return Ok(Err((
            Some(hdr),
            PacketError::Truncated {
                len: hdr.len,
                have: payload,
            },
        )));
    }
    let mut data = vec![0u8; hdr.len as usize];
    gather(mem, descs, HDR_LEN as u64, &mut data)?;
    Ok(Ok((hdr, data)))
}

/// Bytes the device may write into an RX chain (its writable descriptors).
pub fn rx_capacity(descs: &[Desc]) -> u64 {
    descs
        .iter()
        .filter(|d| d.write_only)
        .map(|d| u64::from(d.len))
        .sum()
}

/// Writes `hdr` then `data` across the chain's writable descriptors; returns the bytes written.
/// The caller has checked [`rx_capacity`].
pub fn write_rx(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    hdr: &Header,
    data: &[u8],
) -> Result<u32, ChainError> {
    let raw = hdr.to_bytes();
    let mut parts: [&[u8]; 2] = [&raw, data];
    let mut total = 0u32;
    for d in descs.iter().filter(|d| d.write_only) {
        let mut off = 0u64;
        while off < u64::from(d.len) {
            let Some(part) = parts.iter_mut().find(|p| !p.is_empty()) else {
                return Ok(total);
            };
            let n = (u64::from(d.len) - off).min(part.len() as u64) as usize;
            let bad = || ChainError::BadBuffer {
                addr: d.addr.0,
                len: d.len,
            };
            let at = d.addr.checked_add(off).ok_or_else(bad)?;
            mem.write_slice(&part[..n], at).map_err(|_| bad())?;
            *part = &part[n..];
            off += n as u64;
            total += n as u32;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1234,
            len: 15,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write_only: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write_only,
        }
    }

    #[test]
    fn tx_split_across_descriptors_and_bad_lengths() {
        let m = mem();
        let h = Header {
            len: 5,
            op: op::RW,
            ..Default::default()
        };
        let raw = h.to_bytes();
        // Header split 10 + 34, then the payload in its own descriptor.
        m.write_slice(&raw[..10], GuestAddress(0x100)).unwrap();
        m.write_slice(&raw[10..], GuestAddress(0x200)).unwrap();
        m.write_slice(b"hello", GuestAddress(0x300)).unwrap();
        let descs = [
            desc(0x100, 10, false),
            desc(0x200, 34, false),
            desc(0x300, 5, false),
        ];
        let (got, data) = read_tx(&m, &descs).unwrap().unwrap();
        assert_eq!(got, h);
        assert_eq!(data, b"hello");
        // len beyond the chain.
        let (hdr, e) = read_tx(&m, &descs[..2]).unwrap().unwrap_err();
        assert_eq!(hdr, Some(h));
        assert_eq!(e, PacketError::Truncated { len: 5, have: 0 });
        // Too short for a header; a writable descriptor.
        assert_eq!(
            read_tx(&m, &descs[..1]).unwrap().unwrap_err().1,
            PacketError::ShortHeader
        );
        let w = [desc(0x100, 64, true)];
        assert_eq!(
            read_tx(&m, &w).unwrap().unwrap_err().1,
            PacketError::WritableDescriptor
        );
        // Absurd len.
        let big = Header { len: u32::MAX, ..h };
        m.write_slice(&big.to_bytes(), GuestAddress(0x400)).unwrap();
        assert_eq!(
            read_tx(&m, &[desc(0x400, 44, false)])
                .unwrap()
                .unwrap_err()
                .1,
            PacketError::TooLong(u32::MAX)
        );
    }

    #[test]
    fn rx_scatters_header_and_payload() {
        let m = mem();
        let descs = [desc(0x100, 20, true), desc(0x200, 100, true)];
        assert_eq!(rx_capacity(&descs), 120);
        let h = Header {
            len: 3,
            op: op::RW,
            ..Default::default()
        };
        assert_eq!(write_rx(&m, &descs, &h, b"abc").unwrap(), 47);
        let mut back = [0u8; HDR_LEN];
        m.read_slice(&mut back[..20], GuestAddress(0x100)).unwrap();
        m.read_slice(&mut back[20..], GuestAddress(0x200)).unwrap();
        assert_eq!(Header::from_bytes(&back), h);
        let mut data = [0u8; 3];
        m.read_slice(&mut data, GuestAddress(0x200 + 24)).unwrap();
        assert_eq!(&data, b"abc");
    }
}
