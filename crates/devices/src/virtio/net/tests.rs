//! virtio-net driven through the virtio-pci transport by a test driver (two split rings in a
//! `GuestMemoryMmap`), with a SOCK_SEQPACKET socket pair standing in for the TAP.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::device::{feature, test_check_tx_header};
use super::{Net, Tap};
use crate::virtio::pci_transport::{DEVICE_OFFSET, notify_offset};
use crate::virtio::{VirtioInterrupt, VirtioPciTransport, features, status};

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const RX_BUFS: u64 = 0x20000;
const TX_BUFS: u64 = 0x40000;
const TIMEOUT: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

const DFSEL: u64 = 0x00;
const DF: u64 = 0x04;
const GFSEL: u64 = 0x08;
const GF: u64 = 0x0c;
const STATUS: u64 = 0x14;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_ENABLE: u64 = 0x1c;
const Q_DESC: u64 = 0x20;
const Q_DRIVER: u64 = 0x28;
const Q_DEVICE: u64 = 0x30;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

fn ring(q: u64) -> (u64, u64, u64) {
    let base = 0x1000 + q * 0x3000;
    (base, base + 0x1000, base + 0x2000)
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

struct Driver {
    t: VirtioPciTransport,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    avail: [u16; 2],
    peer: OwnedFd,
}

impl Driver {
    fn new() -> Self {
        let (a, b) = seqpacket_pair();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(mem);
        let dev = Net::new(Tap::from_fd(a), Some(MAC)).unwrap();
        let t = VirtioPciTransport::new(Box::new(dev), mem.clone(), Arc::new(NoIrq), 0, 3).unwrap();
        Self {
            t,
            mem,
            avail: [0; 2],
            peer: b,
        }
    }

    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, len: usize, v: u64) {
        self.t.write(off, &v.to_le_bytes()[..len]);
    }
    fn mem(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> {
        self.mem.memory()
    }

    fn start(&mut self, feats: u64) {
        self.w(STATUS, 1, 0);
        self.w(STATUS, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        self.w(GFSEL, 4, 0);
        self.w(GF, 4, feats & 0xffff_ffff);
        self.w(GFSEL, 4, 1);
        self.w(GF, 4, feats >> 32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w(STATUS, 1, u64::from(s));
        assert_ne!(self.r(STATUS, 1) as u8 & status::FEATURES_OK, 0);
        for q in 0..2u64 {
            let (desc, avail, used) = ring(q);
            self.w(Q_SELECT, 2, q);
            self.w(Q_SIZE, 2, u64::from(QSIZE));
            self.w(Q_DESC, 8, desc);
            self.w(Q_DRIVER, 8, avail);
            self.w(Q_DEVICE, 8, used);
            self.w(Q_ENABLE, 2, 1);
            assert_eq!(self.r(Q_ENABLE, 2), 1);
        }
        self.w(STATUS, 1, u64::from(s | status::DRIVER_OK));
        assert_ne!(self.r(STATUS, 1) as u8 & status::DRIVER_OK, 0);
    }

    fn write_desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let (desc, _, _) = ring(q);
        self.mem()
            .write_slice(&d, GuestAddress(desc + 16 * u64::from(i)))
            .unwrap();
    }

    fn post(&mut self, q: u64, head: u16) {
        let (_, avail, _) = ring(q);
        let idx = &mut self.avail[q as usize];
        let slot = *idx % QSIZE;
        *idx = idx.wrapping_add(1);
        let idx = *idx;
        let m = self.mem();
        m.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        m.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    fn notify(&mut self, q: u64) {
        self.w(notify_offset(q as usize), 2, q);
    }

    fn used_idx(&self, q: u64) -> u16 {
        let (_, _, used) = ring(q);
        self.mem().read_obj(GuestAddress(used + 2)).unwrap()
    }

    fn used_elem(&self, q: u64, i: u16) -> (u32, u32) {
        let (_, _, used) = ring(q);
        let base = used + 4 + 8 * u64::from(i % QSIZE);
        let m = self.mem();
        (
            m.read_obj(GuestAddress(base)).unwrap(),
            m.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    fn wait_used(&self, q: u64, idx: u16) -> bool {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if self.used_idx(q) == idx {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    fn wait_needs_reset(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if self.r(STATUS, 1) as u8 & status::DEVICE_NEEDS_RESET != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Posts RX buffer `i` (`len` bytes) and notifies.
    fn post_rx(&mut self, i: u16, len: u32) {
        self.write_desc(
            0,
            i,
            RX_BUFS + u64::from(i) * 0x1000,
            len,
            VRING_DESC_F_WRITE,
            0,
        );
        self.post(0, i);
        self.notify(0);
    }

    /// Queues a frame as a two-descriptor TX chain at descriptor `i`, split after `split`.
    fn send(&mut self, i: u16, frame: &[u8], split: usize) {
        let addr = TX_BUFS + u64::from(i) * 0x1000;
        self.mem().write_slice(frame, GuestAddress(addr)).unwrap();
        self.write_desc(1, i, addr, split as u32, VRING_DESC_F_NEXT, i + 1);
        let rest = (frame.len() - split) as u32;
        self.write_desc(1, i + 1, addr + split as u64, rest, 0, 0);
        self.post(1, i);
        self.notify(1);
    }

    fn peer_send(&self, frame: &[u8]) {
        // SAFETY: writes `frame` from a live slice to our socket.
        let n = unsafe { libc::send(self.peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize);
    }

    fn peer_recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let start = Instant::now();
        let mut buf = vec![0u8; 70000];
        loop {
            // SAFETY: reads into a live buffer of the given length.
            let n =
                unsafe { libc::recv(self.peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12]; // virtio_net_hdr_v1, no offloads
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(payload);
    f
}

const BASE: u64 = features::VERSION_1 | feature::MAC | feature::STATUS;

#[test]
fn config_and_features() {
    let mut d = Driver::new();
    d.w(DFSEL, 4, 0);
    let lo = d.r(DF, 4);
    d.w(DFSEL, 4, 1);
    let offered = lo | (d.r(DF, 4) << 32);
    for f in [
        BASE,
        feature::CSUM,
        feature::GUEST_CSUM,
        feature::GUEST_TSO4,
        feature::HOST_TSO6,
    ] {
        assert_eq!(offered & f, f);
    }
    assert_eq!(offered & feature::MRG_RXBUF, 0);
    let mut cfg = [0u8; 10];
    for (i, b) in cfg.iter_mut().enumerate() {
        *b = d.r(DEVICE_OFFSET + i as u64, 1) as u8;
    }
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(d.r(DEVICE_OFFSET + 6, 2), 1);
}

#[test]
fn random_mac_is_local_unicast() {
    let (a, _b) = seqpacket_pair();
    let m = Net::new(Tap::from_fd(a), None).unwrap().mac();
    assert_eq!(m[0] & 0x03, 0x02);
}

#[test]
fn tx_frames_reach_the_tap_with_header() {
    let mut d = Driver::new();
    d.start(BASE);
    let f = frame(b"hello over the tap");
    d.send(0, &f, 12);
    assert!(d.wait_used(1, 1));
    assert_eq!(d.used_elem(1, 0), (0, 0));
    assert_eq!(d.peer_recv(TIMEOUT).unwrap(), f);
    // Header and frame in one descriptor split mid-header.
    let f2 = frame(&[7u8; 1000]);
    d.send(2, &f2, 5);
    assert!(d.wait_used(1, 2));
    assert_eq!(d.peer_recv(TIMEOUT).unwrap(), f2);
}

#[test]
fn tx_offloads_not_negotiated_are_dropped() {
    let mut d = Driver::new();
    d.start(BASE);
    let mut f = frame(b"tso");
    f[1] = 1; // GSO_TCPV4 without HOST_TSO4
    d.send(0, &f, 12);
    assert!(d.wait_used(1, 1));
    assert!(d.peer_recv(Duration::from_millis(100)).is_none());
    let mut hdr = [0u8; 12];
    hdr[0] = 1;
    assert!(test_check_tx_header(&hdr, BASE).is_err());
    assert!(test_check_tx_header(&hdr, BASE | feature::CSUM).is_ok());
    hdr[1] = 0x81;
    assert!(test_check_tx_header(&hdr, BASE | feature::CSUM | feature::HOST_TSO4).is_err());
    let all = BASE | feature::CSUM | feature::HOST_TSO4 | feature::HOST_ECN;
    assert!(test_check_tx_header(&hdr, all).is_ok());
    hdr[1] = 3; // UDP
    assert!(test_check_tx_header(&hdr, all).is_err());
}

#[test]
fn rx_waits_for_buffers_and_fills_them() {
    let mut d = Driver::new();
    d.start(BASE);
    let f = frame(b"from the host");
    d.peer_send(&f);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(0), 0);
    // `big` waits in the socket behind `f` until a buffer comes.
    let big = frame(&[9u8; 3000]);
    d.peer_send(&big);
    d.post_rx(0, 2048);
    assert!(d.wait_used(0, 1));
    let (id, len) = d.used_elem(0, 0);
    assert_eq!((id, len as usize), (0, f.len()));
    let mut got = vec![0u8; f.len()];
    d.mem().read_slice(&mut got, GuestAddress(RX_BUFS)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    d.post_rx(1, 100);
    d.peer_send(&f);
    std::thread::sleep(Duration::from_millis(50));
    // `big` (3000+ bytes) was dropped for the 100-byte buffer; `f` fits it.
    assert!(d.wait_used(0, 2));
    assert_eq!(d.used_elem(0, 1), (1, f.len() as u32));
    assert_eq!(d.r(STATUS, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn wrong_direction_and_bad_addresses_need_reset() {
    let mut d = Driver::new();
    d.start(BASE);
    d.write_desc(1, 0, TX_BUFS, 64, VRING_DESC_F_WRITE, 0);
    d.post(1, 0);
    d.notify(1);
    assert!(d.wait_needs_reset());

    let mut d = Driver::new();
    d.start(BASE);
    d.write_desc(0, 0, RX_BUFS, 2048, 0, 0);
    d.post(0, 0);
    d.notify(0);
    d.peer_send(&frame(b"x"));
    assert!(d.wait_needs_reset());

    let mut d = Driver::new();
    d.start(BASE);
    d.write_desc(1, 0, MEM_SIZE as u64 - 8, 64, 0, 0);
    d.post(1, 0);
    d.notify(1);
    assert!(d.wait_needs_reset());

    // A descriptor loop in TX.
    let mut d = Driver::new();
    d.start(BASE);
    d.write_desc(1, 0, TX_BUFS, 16, VRING_DESC_F_NEXT, 1);
    d.write_desc(1, 1, TX_BUFS, 16, VRING_DESC_F_NEXT, 0);
    d.post(1, 0);
    d.notify(1);
    assert!(d.wait_needs_reset());
    // Reset brings it back.
    d.w(STATUS, 1, 0);
    assert_eq!(d.r(STATUS, 1), 0);
}
