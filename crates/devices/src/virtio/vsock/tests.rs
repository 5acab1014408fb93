//! virtio-vsock driven through the virtio-pci transport by a test driver (three split rings in
//! a `GuestMemoryMmap`), against real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::packet::{HDR_LEN, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use super::{Vsock, VsockCounters};
use crate::virtio::pci_transport::{DEVICE_OFFSET, notify_offset};
use crate::virtio::{VirtioInterrupt, VirtioPciTransport, features, status};

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const RX_BUFS: u64 = 0x20000;
const TX_BUFS: u64 = 0x40000;
const RX_BUF_LEN: u32 = 4096;
const CID: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(5);

// Common config offsets (virtio 1.2 §4.1.4.3).
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

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("hp-vsock-ut-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A guest vsock driver in miniature.
struct Driver {
    t: VirtioPciTransport,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    avail: [u16; 3],
    rx_seen: u16,
    tx_next_desc: u16,
    counters: Arc<VsockCounters>,
}

impl Driver {
    fn new(path: &Path) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(mem);
        let dev = Vsock::new(CID, path).unwrap();
        let counters = dev.counters();
        let t = VirtioPciTransport::new(Box::new(dev), mem.clone(), Arc::new(NoIrq), 0, 4).unwrap();
        let mut d = Self {
            t,
            mem,
            avail: [0; 3],
            rx_seen: 0,
            tx_next_desc: 0,
            counters,
        };
        d.start();
        d
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

    fn start(&mut self) {
        self.w(STATUS, 1, 0);
        self.w(STATUS, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        self.w(GFSEL, 4, 1);
        self.w(GF, 4, features::VERSION_1 >> 32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w(STATUS, 1, u64::from(s));
        assert_ne!(self.r(STATUS, 1) as u8 & status::FEATURES_OK, 0);
        for q in 0..3u64 {
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
        for i in 0..QSIZE {
            self.write_desc(
                0,
                i,
                RX_BUFS + u64::from(i) * 0x1000,
                RX_BUF_LEN,
                VRING_DESC_F_WRITE,
                0,
            );
            self.post(0, i);
        }
        self.notify(0);
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

    /// Sends raw bytes as one TX packet, split into header and payload descriptors.
    fn send_raw(&mut self, bytes: &[u8], split: usize) {
        let i = self.tx_next_desc;
        self.tx_next_desc = (i + 2) % QSIZE;
        let addr = TX_BUFS + u64::from(i) * 0x1000;
        self.mem().write_slice(bytes, GuestAddress(addr)).unwrap();
        let split = split.min(bytes.len());
        if split < bytes.len() {
            self.write_desc(1, i, addr, split as u32, VRING_DESC_F_NEXT, i + 1);
            let rest = (bytes.len() - split) as u32;
            self.write_desc(1, i + 1, addr + split as u64, rest, 0, 0);
        } else {
            self.write_desc(1, i, addr, bytes.len() as u32, 0, 0);
        }
        let before = self.used_idx(1);
        self.post(1, i);
        self.notify(1);
        let start = Instant::now();
        while self.used_idx(1) == before {
            assert!(start.elapsed() < TIMEOUT, "TX packet not consumed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.send_raw(&bytes, HDR_LEN);
    }

    /// The next RX packet, within `timeout` (the buffer is posted again).
    fn recv_within(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let start = Instant::now();
        while self.used_idx(0) == self.rx_seen {
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (_, _, used) = ring(0);
        let elem = used + 4 + 8 * u64::from(self.rx_seen % QSIZE);
        let (id, len): (u32, u32) = {
            let m = self.mem();
            (
                m.read_obj(GuestAddress(elem)).unwrap(),
                m.read_obj(GuestAddress(elem + 4)).unwrap(),
            )
        };
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let mut buf = vec![0u8; len as usize];
        self.mem()
            .read_slice(&mut buf, GuestAddress(RX_BUFS + u64::from(id) * 0x1000))
            .unwrap();
        assert!(buf.len() >= HDR_LEN, "short RX packet");
        let h = Header::from_bytes(buf[..HDR_LEN].try_into().unwrap());
        assert_eq!(buf.len(), HDR_LEN + h.len as usize);
        self.post(0, id as u16);
        self.notify(0);
        Some((h, buf[HDR_LEN..].to_vec()))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.recv_within(TIMEOUT).expect("no RX packet")
    }

    fn status(&mut self) -> u8 {
        self.r(STATUS, 1) as u8
    }
}

/// A guest-side header from guest `port` to host `host_port`.
fn g(op: u16, port: u32, host_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: 2,
        src_port: port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Default::default()
    }
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn config_has_guest_cid() {
    let dir = TempDir::new("cfg");
    let mut d = Driver::new(&dir.sock());
    assert_eq!(d.r(DEVICE_OFFSET, 8), CID);
    assert_eq!(d.r(DEVICE_OFFSET + 4, 4), 0);
}

#[test]
fn guest_connects_to_unix_listener_and_data_flows_both_ways() {
    let dir = TempDir::new("guest");
    let sock = dir.sock();
    let listener = UnixListener::bind(format!("{}_1234", sock.display())).unwrap();
    let mut d = Driver::new(&sock);

    d.send(g(op::REQUEST, 5000, 1234), &[]);
    let (h, _) = d.recv();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (op::RESPONSE, 2, CID, 1234, 5000)
    );
    assert!(h.buf_alloc > 0);
    let (mut host, _) = listener.accept().unwrap();

    // Guest -> host, header and payload in one descriptor too.
    d.send(g(op::RW, 5000, 1234), b"ping");
    let mut one = g(op::RW, 5000, 1234).to_bytes().to_vec();
    one[24..28].copy_from_slice(&3u32.to_le_bytes());
    one.extend_from_slice(b"abc");
    d.send_raw(&one, usize::MAX);
    assert_eq!(read_exact_timeout(&mut host, 7), b"pingabc");

    // Host -> guest.
    host.write_all(b"pong").unwrap();
    let (h, data) = d.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, 1234, 5000));
    assert_eq!(data, b"pong");
    // Sent: REQUEST and two RW (7 bytes); received: RESPONSE and one RW (4 bytes).
    let c = &d.counters;
    assert_eq!((c.tx_packets.get(), c.tx_bytes.get()), (3, 7));
    assert_eq!((c.rx_packets.get(), c.rx_bytes.get()), (2, 4));

    // Credit request is answered with our counters.
    d.send(g(op::CREDIT_REQUEST, 5000, 1234), &[]);
    let (h, _) = d.recv();
    assert_eq!(h.op, op::CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt, 7);

    // Full shutdown from the guest: RST back, the host sees end of stream.
    d.send(g(op::SHUTDOWN, 5000, 1234), &[]);
    let mut sd = g(op::SHUTDOWN, 5000, 1234);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    d.send(sd, &[]);
    let (h, _) = d.recv();
    assert_eq!(h.op, op::RST);
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn host_close_sends_shutdown_and_guest_credit_is_respected() {
    let dir = TempDir::new("credit");
    let sock = dir.sock();
    let listener = UnixListener::bind(format!("{}_80", sock.display())).unwrap();
    let mut d = Driver::new(&sock);
    let mut req = g(op::REQUEST, 7, 80);
    req.buf_alloc = 10;
    d.send(req, &[]);
    assert_eq!(d.recv().0.op, op::RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[b'x'; 25]).unwrap();
    let mut got = Vec::new();
    while got.len() < 10 {
        let (h, data) = d.recv();
        assert_eq!(h.op, op::RW);
        got.extend(data);
    }
    assert_eq!(got.len(), 10, "never more than the guest's buf_alloc");
    assert!(d.recv_within(Duration::from_millis(200)).is_none());
    // The guest consumed 10 bytes: 10 more may come.
    let mut upd = g(op::CREDIT_UPDATE, 7, 80);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 10;
    d.send(upd, &[]);
    while got.len() < 20 {
        got.extend(d.recv().1);
    }
    assert_eq!(got.len(), 20);
    assert!(d.recv_within(Duration::from_millis(200)).is_none());
    // Host closes; after the guest frees its buffer the rest and a SHUTDOWN arrive.
    drop(host);
    upd.fwd_cnt = 20;
    d.send(upd, &[]);
    while got.len() < 25 {
        let (h, data) = d.recv();
        assert_eq!(h.op, op::RW);
        got.extend(data);
    }
    upd.fwd_cnt = 25;
    d.send(upd, &[]);
    let (h, _) = d.recv();
    assert_eq!(h.op, op::SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    d.send(g(op::RST, 7, 80), &[]);
}

#[test]
fn rst_when_nobody_listens() {
    let dir = TempDir::new("rst");
    let mut d = Driver::new(&dir.sock());
    d.send(g(op::REQUEST, 5000, 999), &[]);
    let (h, _) = d.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 999, 5000));
}

#[test]
fn host_initiated_connect() {
    let dir = TempDir::new("host");
    let sock = dir.sock();
    let mut d = Driver::new(&sock);
    let mut host = UnixStream::connect(&sock).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (h, _) = d.recv();
    assert_eq!((h.op, h.dst_cid, h.dst_port), (op::REQUEST, CID, 52));
    let local = h.src_port;
    assert!(local >= 1 << 30);
    let mut resp = g(op::RESPONSE, 52, local);
    resp.buf_alloc = 4096;
    d.send(resp, &[]);
    let ok = format!("OK {local}\n");
    assert_eq!(read_exact_timeout(&mut host, ok.len()), ok.as_bytes());
    host.write_all(b"hello guest").unwrap();
    let (h, data) = d.recv();
    assert_eq!((h.op, h.dst_port, h.src_port), (op::RW, 52, local));
    assert_eq!(data, b"hello guest");
    d.send(g(op::RW, 52, local), b"hello host");
    assert_eq!(read_exact_timeout(&mut host, 10), b"hello host");

    // A guest that refuses (RST): the host client sees end of stream, no OK.
    let mut refused = UnixStream::connect(&sock).unwrap();
    refused.write_all(b"CONNECT 53\n").unwrap();
    let (h, _) = d.recv();
    assert_eq!(h.op, op::REQUEST);
    d.send(g(op::RST, 53, h.src_port), &[]);
    refused.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    refused.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // A garbage request line is closed.
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    bad.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(bad.read(&mut [0u8; 8]).unwrap(), 0);
    assert!(d.recv_within(Duration::from_millis(100)).is_none());
}

#[test]
fn malformed_packets_are_dropped_or_reset() {
    let dir = TempDir::new("bad");
    let sock = dir.sock();
    let listener = UnixListener::bind(format!("{}_1234", sock.display())).unwrap();
    let mut d = Driver::new(&sock);

    // Wrong source CID: dropped silently.
    let mut h = g(op::REQUEST, 1, 1234);
    h.src_cid = 9;
    d.send(h, &[]);
    // Shorter than a header: dropped.
    d.send_raw(&[1u8; 20], usize::MAX);
    assert!(d.recv_within(Duration::from_millis(100)).is_none());

    // Not to the host, not a stream, unknown op, data for no connection: RST.
    let mut h = g(op::REQUEST, 2, 1234);
    h.dst_cid = 5;
    d.send(h, &[]);
    assert_eq!(d.recv().0.op, op::RST);
    let mut h = g(op::REQUEST, 3, 1234);
    h.type_ = 2;
    d.send(h, &[]);
    assert_eq!(d.recv().0.op, op::RST);
    d.send(g(99, 4, 1234), &[]);
    assert_eq!(d.recv().0.op, op::RST);
    d.send(g(op::RW, 5, 1234), b"data");
    assert_eq!(d.recv().0.op, op::RST);

    // A live connection: len beyond the chain resets it; so does an unknown op.
    for (port, kind) in [(10u32, "len"), (11, "op"), (12, "huge")] {
        d.send(g(op::REQUEST, port, 1234), &[]);
        assert_eq!(d.recv().0.op, op::RESPONSE);
        let _host = listener.accept().unwrap();
        match kind {
            "len" => {
                let mut b = g(op::RW, port, 1234).to_bytes().to_vec();
                b[24..28].copy_from_slice(&100u32.to_le_bytes());
                b.extend_from_slice(b"short");
                d.send_raw(&b, HDR_LEN);
            }
            "op" => d.send(g(0x7777, port, 1234), &[]),
            _ => {
                let mut b = g(op::RW, port, 1234).to_bytes().to_vec();
                b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
                d.send_raw(&b, HDR_LEN);
            }
        }
        let (h, _) = d.recv();
        assert_eq!((h.op, h.dst_port), (op::RST, port), "{kind}");
    }
    // RST for nothing: no answer (no RST storms).
    d.send(g(op::RST, 77, 1234), &[]);
    assert!(d.recv_within(Duration::from_millis(100)).is_none());
    // Of the data, only the well-formed RW (4 bytes, to no connection) was the guest's stream
    // data; the truncated and oversized ones count nothing, and no data went to the guest.
    assert_eq!(d.counters.tx_bytes.get(), 4);
    assert_eq!(d.counters.rx_bytes.get(), 0);

    // Still a working device.
    d.send(g(op::REQUEST, 20, 1234), &[]);
    assert_eq!(d.recv().0.op, op::RESPONSE);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn broken_tx_ring_sets_needs_reset() {
    let dir = TempDir::new("ring");
    let mut d = Driver::new(&dir.sock());
    d.write_desc(1, 0, MEM_SIZE as u64 - 8, 64, 0, 0);
    d.post(1, 0);
    d.notify(1);
    let start = Instant::now();
    while d.status() & status::DEVICE_NEEDS_RESET == 0 {
        assert!(start.elapsed() < TIMEOUT, "no DEVICE_NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(1));
    }
    // A reset brings it back, with the listener still there.
    d.w(STATUS, 1, 0);
    assert_eq!(d.status(), 0);
    assert!(UnixStream::connect(dir.sock()).is_ok());
}
