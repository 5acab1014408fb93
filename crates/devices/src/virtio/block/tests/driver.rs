//! The test driver: a guest's side of virtio-blk, laying requests out in split rings in guest
//! memory and notifying through the queue eventfds.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk as b;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::super::{Block, IoEngine};
use crate::virtio::interrupt::DeviceInterrupt;
use crate::virtio::{ActivatedQueue, VirtioDevice, VirtioInterrupt, features};

pub(super) const MEM_SIZE: usize = 4 << 20;
pub(super) const QSIZE: u16 = 128;
pub(super) const DISK_SIZE: u64 = 1 << 20;
pub(super) const HDR: u64 = 0x80000;
pub(super) const STATUS: u64 = 0x81000;
pub(super) const DATA: u64 = 0x90000;
/// Batches: request `i` has its header at `BATCH_HDR + 16 i`, its status byte at
/// `BATCH_STATUS + i`, its data at `BATCH_DATA + BATCH_STRIDE i`, and descriptors `3 i..3 i + 2`.
pub(super) const BATCH_HDR: u64 = 0x84000;
pub(super) const BATCH_STATUS: u64 = 0x86000;
pub(super) const BATCH_DATA: u64 = 0x100000;
pub(super) const BATCH_STRIDE: u64 = 0x10000;
pub(super) const BATCH_MAX: usize = 32;
pub(super) const TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const ENGINES: [IoEngine; 2] = [IoEngine::Uring, IoEngine::Sync];

/// Counts interrupts on an eventfd, so a driver can sleep until the device signals.
struct EventIrq(EventFd);
impl VirtioInterrupt for EventIrq {
    fn trigger(&self, _vector: u16) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Whether this kernel lets us use io_uring (else the Uring engine falls back, as designed).
pub(super) fn uring_available() -> bool {
    io_uring::IoUring::new(2).is_ok()
}

/// Ring addresses of queue `q`.
pub(super) fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

/// One request of a batch: type, sector, data length (0: none).
#[derive(Clone, Copy)]
pub(super) struct Req {
    pub(super) t: u32,
    pub(super) sector: u64,
    pub(super) len: u32,
}

pub(super) struct Driver {
    pub(super) dev: Block,
    pub(super) expect: IoEngine,
    pub(super) mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub(super) irq: DeviceInterrupt,
    pub(super) irq_event: EventFd,
    pub(super) events: Vec<EventFd>,
    pub(super) avail: Vec<u16>,
    pub(super) image: tempfile::NamedTempFile,
}

pub(super) fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.as_file_mut().set_len(DISK_SIZE).unwrap();
    f.flush().unwrap();
    f
}

impl Driver {
    pub(super) fn new(readonly: bool, num_queues: u16) -> Self {
        Self::on(IoEngine::Uring, readonly, num_queues)
    }

    pub(super) fn on(engine: IoEngine, readonly: bool, num_queues: u16) -> Self {
        Self::with_image(image(), engine, readonly, num_queues)
    }

    pub(super) fn with_image(
        image: tempfile::NamedTempFile,
        engine: IoEngine,
        readonly: bool,
        num_queues: u16,
    ) -> Self {
        let dev = Block::open_raw(image.path(), readonly, num_queues, Some("test-disk"))
            .unwrap()
            .with_io_engine(engine);
        // The engine asked for is the one serving, unless the kernel refuses io_uring.
        let expect = match engine {
            IoEngine::Uring if !uring_available() => IoEngine::Sync,
            e => e,
        };
        Self::with_block(dev, expect, image, num_queues)
    }

    /// Drives `dev`, which must run on engine `expect`; `image` is its image file.
    pub(super) fn with_block(
        dev: Block,
        expect: IoEngine,
        image: tempfile::NamedTempFile,
        num_queues: u16,
    ) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(mem);
        let irq_event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = DeviceInterrupt::new(
            "blk-test",
            usize::from(num_queues),
            Arc::new(EventIrq(irq_event.try_clone().unwrap())),
        );
        let mut d = Self {
            dev,
            expect,
            mem,
            irq,
            irq_event,
            events: Vec::new(),
            avail: vec![0; usize::from(num_queues)],
            image,
        };
        d.start(d.dev.features() & !features::RING_EVENT_IDX);
        d
    }

    pub(super) fn start(&mut self, feats: u64) {
        let n = self.avail.len();
        let mut queues = Vec::new();
        self.events.clear();
        for index in 0..n {
            let (desc, avail, used) = rings(index);
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
            q.set_event_idx(feats & features::RING_EVENT_IDX != 0);
            q.set_ready(true);
            let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            self.events.push(event.try_clone().unwrap());
            queues.push(ActivatedQueue {
                index,
                queue: q,
                event,
            });
        }
        self.dev
            .activate(self.mem.clone(), feats, queues, self.irq.clone())
            .unwrap();
        assert_eq!(self.dev.io_engine(), Some(self.expect));
    }

    pub(super) fn mem(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> {
        self.mem.memory()
    }

    pub(super) fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem()
            .write_slice(&d, GuestAddress(rings(q).0 + 16 * u64::from(i)))
            .unwrap();
    }

    pub(super) fn used_idx(&self, q: usize) -> u16 {
        self.mem().read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// Used ring entry `n` (counting from the ring's start) of queue `q`: (head, length).
    pub(super) fn used_entry(&self, q: usize, n: u16) -> (u16, u32) {
        let at = rings(q).2 + 4 + 8 * u64::from(n % QSIZE);
        let id: u32 = self.mem().read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem().read_obj(GuestAddress(at + 4)).unwrap();
        (id as u16, len)
    }

    /// Makes the chain at `head` available on queue `q` (without notifying).
    pub(super) fn post(&mut self, q: usize, head: u16) {
        let avail = rings(q).1;
        let slot = self.avail[q] % QSIZE;
        self.mem()
            .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem()
            .write_obj(self.avail[q], GuestAddress(avail + 2))
            .unwrap();
    }

    /// Waits until queue `q` has used everything made available; false on timeout or reset.
    pub(super) fn wait_all_used(&self, q: usize) -> bool {
        let start = Instant::now();
        while self.used_idx(q) != self.avail[q] {
            if start.elapsed() > TIMEOUT || self.irq.needs_reset() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Submits the chain `descs` (`(addr, len, writable)`) on queue `q` and waits for it to be
    /// used; returns (status byte at STATUS, used length), or None if it never completed.
    pub(super) fn submit_on(&mut self, q: usize, descs: &[(u64, u32, bool)]) -> Option<(u8, u32)> {
        self.mem().write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(q, i as u16, addr, len, flags, i as u16 + 1);
        }
        self.post(q, 0);
        self.events[q].write(1).unwrap();
        if !self.wait_all_used(q) {
            return None;
        }
        let (_, used_len) = self.used_entry(q, self.avail[q].wrapping_sub(1));
        let status: u8 = self.mem().read_obj(GuestAddress(STATUS)).unwrap();
        Some((status, used_len))
    }

    /// Lays out batch request `i` (see BATCH_*) as chain `3 i` on queue `q`, status 0xff.
    pub(super) fn prepare(&self, q: usize, i: usize, r: Req) -> u16 {
        assert!(i < BATCH_MAX);
        let m = self.mem();
        let hdr = BATCH_HDR + 16 * i as u64;
        m.write_obj(r.t, GuestAddress(hdr)).unwrap();
        m.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        m.write_obj(r.sector, GuestAddress(hdr + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(BATCH_STATUS + i as u64))
            .unwrap();
        let head = 3 * i as u16;
        let status = BATCH_STATUS + i as u64;
        if r.len == 0 {
            self.write_desc(q, head, hdr, 16, VRING_DESC_F_NEXT, head + 2);
        } else {
            let write = if r.t == b::VIRTIO_BLK_T_IN {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            self.write_desc(q, head, hdr, 16, VRING_DESC_F_NEXT, head + 1);
            self.write_desc(
                q,
                head + 1,
                batch_data(i),
                r.len,
                write | VRING_DESC_F_NEXT,
                head + 2,
            );
        }
        self.write_desc(q, head + 2, status, 1, VRING_DESC_F_WRITE, 0);
        head
    }

    /// Makes every request of `reqs` available on queue `q` at once, notifies once, and waits
    /// for all; returns the heads in the order they were used, with their used lengths.
    pub(super) fn batch(&mut self, q: usize, reqs: &[Req]) -> Option<Vec<(u16, u32)>> {
        let first = self.avail[q];
        for (i, &r) in reqs.iter().enumerate() {
            let head = self.prepare(q, i, r);
            self.post(q, head);
        }
        self.events[q].write(1).unwrap();
        if !self.wait_all_used(q) {
            return None;
        }
        Some(
            (0..reqs.len() as u16)
                .map(|n| self.used_entry(q, first.wrapping_add(n)))
                .collect(),
        )
    }

    /// Interrupts since the last call.
    pub(super) fn interrupts(&self) -> u64 {
        self.irq_event.read().unwrap_or(0)
    }

    /// Sleeps until the device interrupts (or a second passes); the interrupts since the last
    /// call.
    pub(super) fn wait_interrupt(&self) -> u64 {
        let mut fd = libc::pollfd {
            fd: self.irq_event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fd` is one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut fd, 1, 1000) };
        self.interrupts()
    }

    pub(super) fn batch_status(&self, i: usize) -> u8 {
        self.mem()
            .read_obj(GuestAddress(BATCH_STATUS + i as u64))
            .unwrap()
    }

    pub(super) fn batch_data(&self, i: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem()
            .read_slice(&mut v, GuestAddress(batch_data(i)))
            .unwrap();
        v
    }

    pub(super) fn header(&self, t: u32, sector: u64) {
        let m = self.mem();
        m.write_obj(t, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    pub(super) fn rw(&mut self, t: u32, sector: u64, len: u32) -> (u8, u32) {
        self.header(t, sector);
        let write = t == b::VIRTIO_BLK_T_IN || t == b::VIRTIO_BLK_T_GET_ID;
        self.submit_on(
            0,
            &[(HDR, 16, false), (DATA, len, write), (STATUS, 1, true)],
        )
        .expect("request not completed")
    }

    pub(super) fn simple(&mut self, t: u32) -> (u8, u32) {
        self.header(t, 0);
        self.submit_on(0, &[(HDR, 16, false), (STATUS, 1, true)])
            .expect("request not completed")
    }

    pub(super) fn fill(&self, len: usize, byte: u8) {
        self.mem()
            .write_slice(&vec![byte; len], GuestAddress(DATA))
            .unwrap();
    }

    pub(super) fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem().read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    pub(super) fn file(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.image.as_file().read_exact_at(&mut v, offset).unwrap();
        v
    }

    /// DISCARD / WRITE_ZEROES with the given `(sector, count, flags)` segments.
    pub(super) fn ranges(&mut self, t: u32, segs: &[(u64, u32, u32)]) -> (u8, u32) {
        self.header(t, 0);
        for (i, &(sector, count, flags)) in segs.iter().enumerate() {
            let at = DATA + 16 * i as u64;
            let m = self.mem();
            m.write_obj(sector, GuestAddress(at)).unwrap();
            m.write_obj(count, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        }
        let len = 16 * segs.len() as u32;
        self.submit_on(
            0,
            &[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)],
        )
        .expect("request not completed")
    }
}

pub(super) fn batch_data(i: usize) -> u64 {
    BATCH_DATA + BATCH_STRIDE * i as u64
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.dev.reset();
    }
}
