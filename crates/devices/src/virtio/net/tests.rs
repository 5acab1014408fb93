//! virtio-net driven through the virtio-pci transport by a test driver (split rings in a
//! `GuestMemoryMmap`), with a SOCK_SEQPACKET socket pair standing in for each TAP queue.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::ctrl::{CLASS_MQ, ERR, MQ_VQ_PAIRS_SET, OK};
use super::device::{feature, test_check_tx_header};
use super::{Net, NetCounters, Tap};
use crate::virtio::pci_transport::{DEVICE_OFFSET, notify_offset};
use crate::virtio::{
    CounterSet, VirtioDevice, VirtioInterrupt, VirtioPciTransport, features, status,
};

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 16;
const RX_BUFS: u64 = 0x20000;
const TX_BUFS: u64 = 0x200000;
const CTRL_BUFS: u64 = 0x380000;
/// Each queue's buffers are this far apart from the next queue's.
const QUEUE_BUFS: u64 = 0x20000;
const TIMEOUT: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

const DFSEL: u64 = 0x00;
const DF: u64 = 0x04;
const GFSEL: u64 = 0x08;
const GF: u64 = 0x0c;
const STATUS: u64 = 0x14;
const NUM_QUEUES: u64 = 0x12;
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
    avail: Vec<u16>,
    /// The other end of each TAP queue.
    peers: Vec<OwnedFd>,
    peer: OwnedFd,
    counters: Arc<NetCounters>,
}

impl Driver {
    fn new() -> Self {
        Self::with_pairs(1)
    }

    fn with_pairs(pairs: usize) -> Self {
        let (taps, mut peers): (Vec<Tap>, Vec<OwnedFd>) = (0..pairs)
            .map(|_| {
                let (a, b) = seqpacket_pair();
                (Tap::from_fd(a), b)
            })
            .unzip();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(mem);
        let dev = Net::new(taps, Some(MAC)).unwrap();
        let counters = dev.counters();
        let queues = dev.queue_max_sizes().len();
        let t = VirtioPciTransport::new(
            Box::new(dev),
            mem.clone(),
            Arc::new(NoIrq),
            0,
            queues as u16 + 1,
        )
        .unwrap();
        let peer = peers.remove(0);
        Self {
            t,
            mem,
            avail: vec![0; queues],
            peers,
            peer,
            counters,
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
        self.start_queues(feats, 2);
    }

    /// Negotiates `feats` and enables the first `queues` queues.
    fn start_queues(&mut self, feats: u64, queues: u64) {
        self.w(STATUS, 1, 0);
        self.w(STATUS, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        self.w(GFSEL, 4, 0);
        self.w(GF, 4, feats & 0xffff_ffff);
        self.w(GFSEL, 4, 1);
        self.w(GF, 4, feats >> 32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w(STATUS, 1, u64::from(s));
        assert_ne!(self.r(STATUS, 1) as u8 & status::FEATURES_OK, 0);
        for q in 0..queues {
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

    /// The device's counters: (name, value) for each that is not zero.
    fn counts(&self) -> Vec<(String, u64)> {
        let s = self.counters.snapshot();
        s.into_iter().filter(|&(_, v)| v != 0).collect()
    }

    /// The peer of pair `pair`'s TAP queue.
    fn peer_of(&self, pair: usize) -> &OwnedFd {
        if pair == 0 {
            &self.peer
        } else {
            &self.peers[pair - 1]
        }
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

    /// Posts a control command on queue `q` at descriptors `i`, `i + 1`: `cmd` device-readable
    /// (no descriptor if empty), then a one-byte ack; returns the ack once the chain is used.
    fn ctrl(&mut self, q: u64, i: u16, cmd: &[u8]) -> Option<u8> {
        let addr = CTRL_BUFS + u64::from(i) * 0x100;
        let ack = addr + 0x80;
        self.mem().write_slice(cmd, GuestAddress(addr)).unwrap();
        self.mem().write_obj(0xeeu8, GuestAddress(ack)).unwrap();
        let head = if cmd.is_empty() {
            self.write_desc(q, i + 1, ack, 1, VRING_DESC_F_WRITE, 0);
            i + 1
        } else {
            self.write_desc(q, i, addr, cmd.len() as u32, VRING_DESC_F_NEXT, i + 1);
            self.write_desc(q, i + 1, ack, 1, VRING_DESC_F_WRITE, 0);
            i
        };
        let before = self.used_idx(q);
        self.post(q, head);
        self.notify(q);
        if !self.wait_used(q, before.wrapping_add(1)) {
            return None;
        }
        Some(self.mem().read_obj(GuestAddress(ack)).unwrap())
    }

    fn needs_reset(&mut self) -> bool {
        self.r(STATUS, 1) as u8 & status::DEVICE_NEEDS_RESET != 0
    }

    /// Where RX buffer `i` of queue `q` lives.
    fn rx_buf(q: u64, i: u16) -> u64 {
        RX_BUFS + q * QUEUE_BUFS + u64::from(i) * 0x1000
    }

    /// Posts RX buffer `i` (`len` bytes) and notifies.
    fn post_rx(&mut self, i: u16, len: u32) {
        self.post_rx_on(0, i, len);
    }

    /// Posts RX buffer `i` (`len` bytes) on queue `q` and notifies.
    fn post_rx_on(&mut self, q: u64, i: u16, len: u32) {
        self.write_desc(q, i, Self::rx_buf(q, i), len, VRING_DESC_F_WRITE, 0);
        self.post(q, i);
        self.notify(q);
    }

    /// Queues a frame as a two-descriptor TX chain at descriptor `i`, split after `split`.
    fn send(&mut self, i: u16, frame: &[u8], split: usize) {
        self.send_on(1, i, frame, split);
    }

    /// [`Self::send`] on TX queue `q`.
    fn send_on(&mut self, q: u64, i: u16, frame: &[u8], split: usize) {
        let addr = TX_BUFS + q * QUEUE_BUFS + u64::from(i) * 0x1000;
        self.mem().write_slice(frame, GuestAddress(addr)).unwrap();
        self.write_desc(q, i, addr, split as u32, VRING_DESC_F_NEXT, i + 1);
        let rest = (frame.len() - split) as u32;
        self.write_desc(q, i + 1, addr + split as u64, rest, 0, 0);
        self.post(q, i);
        self.notify(q);
    }

    fn peer_send(&self, frame: &[u8]) {
        self.peer_send_on(0, frame);
    }

    fn peer_send_on(&self, pair: usize, frame: &[u8]) {
        let fd = self.peer_of(pair).as_raw_fd();
        // SAFETY: writes `frame` from a live slice to our socket.
        let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize);
    }

    fn peer_recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.peer_recv_on(0, timeout)
    }

    fn peer_recv_on(&self, pair: usize, timeout: Duration) -> Option<Vec<u8>> {
        let fd = self.peer_of(pair).as_raw_fd();
        let start = Instant::now();
        let mut buf = vec![0u8; 70000];
        loop {
            // SAFETY: reads into a live buffer of the given length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
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
    assert_eq!(offered & feature::MRG_RXBUF, feature::MRG_RXBUF);
    assert_eq!(
        offered & (feature::MQ | feature::CTRL_VQ),
        0,
        "one pair: no multiqueue"
    );
    assert_eq!(d.r(NUM_QUEUES, 2), 2);
    assert_eq!(d.r(DEVICE_OFFSET + 8, 2), 1, "max_virtqueue_pairs");
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
    let m = Net::new(vec![Tap::from_fd(a)], None).unwrap().mac();
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
fn counters_count_frames_without_the_header_and_drops() {
    let mut d = Driver::new();
    d.start(BASE);
    let f = frame(b"hello");
    d.send(0, &f, 12);
    assert!(d.wait_used(1, 1));
    assert_eq!(d.peer_recv(TIMEOUT).unwrap(), f);
    // An offload the driver did not negotiate: dropped.
    let mut tso = frame(b"tso");
    tso[1] = 1;
    d.send(2, &tso, 12);
    assert!(d.wait_used(1, 2));
    // RX: one frame delivered; one too big for the next buffer dropped, the one after fits.
    let small = frame(&[1u8; 100]);
    d.post_rx(0, 2048);
    d.peer_send(&small);
    assert!(d.wait_used(0, 1));
    d.post_rx(1, 100);
    d.peer_send(&frame(&[2u8; 3000]));
    d.peer_send(&f);
    assert!(d.wait_used(0, 2));
    assert_eq!(d.used_elem(0, 1), (1, f.len() as u32));
    // Frame bytes are the Ethernet frame, without the 12-byte virtio-net header.
    assert_eq!(
        d.counts(),
        [
            ("rx_bytes".into(), (small.len() + f.len() - 24) as u64),
            ("rx_dropped".into(), 1),
            ("rx_frames".into(), 2),
            ("tx_bytes".into(), (f.len() - 12) as u64),
            ("tx_dropped".into(), 1),
            ("tx_frames".into(), 1),
        ]
    );
    // A chain that breaks the queue sends nothing and counts nothing.
    d.write_desc(1, 4, MEM_SIZE as u64 - 8, 64, 0, 0);
    d.post(1, 4);
    d.notify(1);
    assert!(d.wait_needs_reset());
    assert_eq!(d.counters.snapshot()["tx_frames"], 1);
    assert_eq!(d.counters.snapshot()["tx_dropped"], 1);
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

const MQ_FEATS: u64 = BASE | feature::MQ | feature::CTRL_VQ;
/// Queue indices with two pairs: rx0, tx0, rx1, tx1, control.
const RX1: u64 = 2;
const TX1: u64 = 3;
const CTRLQ: u64 = 4;

fn pairs_set(n: u16) -> [u8; 4] {
    let [lo, hi] = n.to_le_bytes();
    [CLASS_MQ, MQ_VQ_PAIRS_SET, lo, hi]
}

#[test]
fn multiqueue_is_offered_with_pairs_and_config_says_how_many() {
    let mut d = Driver::with_pairs(3);
    d.w(DFSEL, 4, 0);
    let offered = d.r(DF, 4);
    let mq = feature::MQ | feature::CTRL_VQ | feature::MRG_RXBUF;
    assert_eq!(offered & mq, mq);
    assert_eq!(d.r(NUM_QUEUES, 2), 7, "3 pairs and the control queue");
    assert_eq!(d.r(DEVICE_OFFSET + 8, 2), 3, "max_virtqueue_pairs");
    assert!(Net::new(Vec::new(), Some(MAC)).is_err());
}

#[test]
fn pair_1_carries_traffic_once_the_driver_asks_for_two_pairs() {
    let mut d = Driver::with_pairs(2);
    d.start_queues(MQ_FEATS, 5);
    // A frame at pair 1's TAP queue waits while only pair 0 is in use, buffers or not.
    d.post_rx_on(RX1, 0, 2048);
    let f = frame(b"to pair one");
    d.peer_send_on(1, &f);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(RX1), 0);

    assert_eq!(d.ctrl(CTRLQ, 0, &pairs_set(2)), Some(OK));
    assert!(d.wait_used(RX1, 1), "pair 1 reads its TAP queue now");
    assert_eq!(d.used_elem(RX1, 0), (0, f.len() as u32));
    let mut got = vec![0u8; f.len()];
    d.mem()
        .read_slice(&mut got, GuestAddress(Driver::rx_buf(RX1, 0)))
        .unwrap();
    assert_eq!(&got[12..], &f[12..]);

    // TX on pair 1 goes to its own TAP queue, not pair 0's.
    let g = frame(b"from pair one");
    d.send_on(TX1, 0, &g, 12);
    assert!(d.wait_used(TX1, 1));
    assert_eq!(d.peer_recv_on(1, TIMEOUT).unwrap(), g);
    assert!(d.peer_recv_on(0, Duration::from_millis(50)).is_none());

    // Back to one pair: pair 1 stops reading; pair 0 goes on.
    assert_eq!(d.ctrl(CTRLQ, 2, &pairs_set(1)), Some(OK));
    d.post_rx_on(RX1, 1, 2048);
    d.peer_send_on(1, &f);
    d.post_rx(0, 2048);
    d.peer_send(&f);
    assert!(d.wait_used(0, 1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(RX1), 1, "pair 1 is idle again");
    assert!(!d.needs_reset());
    // The device's counts are both pairs' summed.
    let (rx, tx) = ((f.len() - 12) as u64, (g.len() - 12) as u64);
    assert_eq!(
        d.counts(),
        [
            ("rx_bytes".into(), 2 * rx),
            ("rx_frames".into(), 2),
            ("tx_bytes".into(), tx),
            ("tx_frames".into(), 1),
        ]
    );
}

#[test]
fn control_commands_out_of_range_or_unknown_get_err() {
    let mut d = Driver::with_pairs(2);
    d.start_queues(MQ_FEATS, 5);
    let cmds: [&[u8]; 9] = [
        &pairs_set(0),
        &pairs_set(3),
        &pairs_set(0xffff),
        &[CLASS_MQ, 1, 2, 0],            // RSS config: not offered
        &[0, 0, 1],                      // RX mode (promiscuous): not offered
        &[1, 1, 0, 0, 0, 0],             // MAC table: not offered
        &[CLASS_MQ, MQ_VQ_PAIRS_SET, 2], // truncated argument
        &[CLASS_MQ],
        &[],
    ];
    for (n, cmd) in cmds.iter().enumerate() {
        let i = (2 * n % 16) as u16;
        assert_eq!(d.ctrl(CTRLQ, i, cmd), Some(ERR), "{cmd:?}");
    }
    assert_eq!(d.ctrl(CTRLQ, 0, &pairs_set(2)), Some(OK));
    assert_eq!(
        d.ctrl(CTRLQ, 2, &pairs_set(2)),
        Some(OK),
        "again: no change"
    );
    assert!(!d.needs_reset());
}

#[test]
fn without_mq_the_control_queue_is_queue_2_and_refuses_pairs() {
    let mut d = Driver::with_pairs(2);
    d.start_queues(BASE | feature::CTRL_VQ, 3);
    assert_eq!(d.ctrl(2, 0, &pairs_set(2)), Some(ERR));
    assert_eq!(d.ctrl(2, 2, &pairs_set(1)), Some(ERR));
    let f = frame(b"still pair 0");
    d.send(0, &f, 12);
    assert_eq!(d.peer_recv(TIMEOUT).unwrap(), f);
}

#[test]
fn malformed_control_chains_need_reset() {
    // A command without a writable ack byte.
    let mut d = Driver::with_pairs(2);
    d.start_queues(MQ_FEATS, 5);
    d.mem()
        .write_slice(&pairs_set(2), GuestAddress(CTRL_BUFS))
        .unwrap();
    d.write_desc(CTRLQ, 0, CTRL_BUFS, 4, 0, 0);
    d.post(CTRLQ, 0);
    d.notify(CTRLQ);
    assert!(d.wait_needs_reset());

    // The ack before the command.
    let mut d = Driver::with_pairs(2);
    d.start_queues(MQ_FEATS, 5);
    d.write_desc(
        CTRLQ,
        0,
        CTRL_BUFS,
        1,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        1,
    );
    d.write_desc(CTRLQ, 1, CTRL_BUFS + 0x10, 4, 0, 0);
    d.post(CTRLQ, 0);
    d.notify(CTRLQ);
    assert!(d.wait_needs_reset());

    // A command buffer outside guest memory.
    let mut d = Driver::with_pairs(2);
    d.start_queues(MQ_FEATS, 5);
    d.write_desc(CTRLQ, 0, MEM_SIZE as u64 - 2, 4, VRING_DESC_F_NEXT, 1);
    d.write_desc(CTRLQ, 1, CTRL_BUFS, 1, VRING_DESC_F_WRITE, 0);
    d.post(CTRLQ, 0);
    d.notify(CTRLQ);
    assert!(d.wait_needs_reset());
}

#[test]
fn mergeable_rx_spreads_a_frame_over_chains() {
    let mut d = Driver::new();
    d.start(BASE | feature::MRG_RXBUF);
    d.post_rx(0, 64);
    let f = frame(&[5u8; 150]);
    assert_eq!(f.len(), 176);
    d.peer_send(&f);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(0), 0, "held until there is room");
    d.post_rx(1, 64);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(0), 0);
    d.post_rx(2, 64);
    assert!(d.wait_used(0, 3));
    assert_eq!(
        [d.used_elem(0, 0), d.used_elem(0, 1), d.used_elem(0, 2)],
        [(0, 64), (1, 64), (2, 48)]
    );
    let mut got = Vec::new();
    for (i, len) in [(0, 64), (1, 64), (2, 48)] {
        let mut b = vec![0u8; len];
        d.mem()
            .read_slice(&mut b, GuestAddress(Driver::rx_buf(0, i)))
            .unwrap();
        got.extend_from_slice(&b);
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[12..], &f[12..]);

    // A frame that fits one buffer takes one.
    d.post_rx(3, 64);
    let small = frame(b"x");
    d.peer_send(&small);
    assert!(d.wait_used(0, 4));
    assert_eq!(d.used_elem(0, 3), (3, small.len() as u32));
    let hdr = d
        .mem()
        .read_obj::<u16>(GuestAddress(Driver::rx_buf(0, 3) + 10));
    assert_eq!(hdr.unwrap(), 1);
    assert!(!d.needs_reset());
}

#[test]
fn mergeable_rx_drops_a_frame_the_whole_ring_cannot_hold() {
    let mut d = Driver::new();
    d.start(BASE | feature::MRG_RXBUF);
    // 16 buffers of 64 bytes: 1 KiB, less than the frame.
    d.peer_send(&frame(&[1u8; 2000]));
    for i in 0..QSIZE {
        d.post_rx(i, 64);
    }
    let small = frame(b"after the drop");
    d.peer_send(&small);
    assert!(d.wait_used(0, 1));
    assert_eq!(d.used_elem(0, 0), (0, small.len() as u32));
    assert!(!d.needs_reset());
}
