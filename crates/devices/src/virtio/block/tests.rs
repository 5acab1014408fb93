//! virtio-blk against a temporary raw image, driven by a test driver that lays requests out in
//! split rings in guest memory as a guest would, and notifies through the queue eventfds.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk as b;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{Block, DiskError, RawFile, feature, serial_for, status};
use crate::virtio::interrupt::DeviceInterrupt;
use crate::virtio::{ActivatedQueue, VirtioDevice, VirtioInterrupt, features};

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const DISK_SIZE: u64 = 1 << 20;
const HDR: u64 = 0x80000;
const STATUS: u64 = 0x81000;
const DATA: u64 = 0x90000;
const TIMEOUT: Duration = Duration::from_secs(5);

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ring addresses of queue `q`.
fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

struct Driver {
    dev: Block,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    irq: DeviceInterrupt,
    events: Vec<EventFd>,
    avail: Vec<u16>,
    image: tempfile::NamedTempFile,
}

fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.as_file_mut().set_len(DISK_SIZE).unwrap();
    f.flush().unwrap();
    f
}

impl Driver {
    fn new(readonly: bool, num_queues: u16) -> Self {
        Self::with_image(image(), readonly, num_queues)
    }

    fn with_image(image: tempfile::NamedTempFile, readonly: bool, num_queues: u16) -> Self {
        let dev = Block::open_raw(image.path(), readonly, num_queues, Some("test-disk")).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(mem);
        let irq = DeviceInterrupt::new("blk-test", usize::from(num_queues), Arc::new(NoIrq));
        let mut d = Self {
            dev,
            mem,
            irq,
            events: Vec::new(),
            avail: vec![0; usize::from(num_queues)],
            image,
        };
        d.start(d.dev.features() & !features::RING_EVENT_IDX);
        d
    }

    fn start(&mut self, feats: u64) {
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
    }

    fn mem(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> {
        self.mem.memory()
    }

    fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem()
            .write_slice(&d, GuestAddress(rings(q).0 + 16 * u64::from(i)))
            .unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem().read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// Submits the chain `descs` (`(addr, len, writable)`) on queue `q` and waits for it to be
    /// used; returns (status byte at STATUS, used length), or None if it never completed.
    fn submit_on(&mut self, q: usize, descs: &[(u64, u32, bool)]) -> Option<(u8, u32)> {
        self.mem().write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(q, i as u16, addr, len, flags, i as u16 + 1);
        }
        let (_, avail, used) = rings(q);
        let slot = self.avail[q] % QSIZE;
        self.mem()
            .write_obj(0u16, GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem()
            .write_obj(self.avail[q], GuestAddress(avail + 2))
            .unwrap();
        self.events[q].write(1).unwrap();
        let start = Instant::now();
        while self.used_idx(q) != self.avail[q] {
            if start.elapsed() > TIMEOUT || self.irq.needs_reset() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let used_len: u32 = self
            .mem()
            .read_obj(GuestAddress(used + 4 + 8 * u64::from(slot) + 4))
            .unwrap();
        let status: u8 = self.mem().read_obj(GuestAddress(STATUS)).unwrap();
        Some((status, used_len))
    }

    fn header(&self, t: u32, sector: u64) {
        let m = self.mem();
        m.write_obj(t, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn rw(&mut self, t: u32, sector: u64, len: u32) -> (u8, u32) {
        self.header(t, sector);
        let write = t == b::VIRTIO_BLK_T_IN || t == b::VIRTIO_BLK_T_GET_ID;
        self.submit_on(
            0,
            &[(HDR, 16, false), (DATA, len, write), (STATUS, 1, true)],
        )
        .expect("request not completed")
    }

    fn simple(&mut self, t: u32) -> (u8, u32) {
        self.header(t, 0);
        self.submit_on(0, &[(HDR, 16, false), (STATUS, 1, true)])
            .expect("request not completed")
    }

    fn fill(&self, len: usize, byte: u8) {
        self.mem()
            .write_slice(&vec![byte; len], GuestAddress(DATA))
            .unwrap();
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem().read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    fn file(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.image.as_file().read_exact_at(&mut v, offset).unwrap();
        v
    }

    /// DISCARD / WRITE_ZEROES with the given `(sector, count, flags)` segments.
    fn ranges(&mut self, t: u32, segs: &[(u64, u32, u32)]) -> (u8, u32) {
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

impl Drop for Driver {
    fn drop(&mut self) {
        self.dev.reset();
    }
}

fn config_u64(dev: &Block, off: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.read_config(off, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn features_and_config_space() {
    let d = Driver::new(false, 4);
    let f = d.dev.features();
    for bit in [
        feature::FLUSH,
        feature::BLK_SIZE,
        feature::SEG_MAX,
        feature::SIZE_MAX,
        feature::MQ,
        feature::DISCARD,
        feature::WRITE_ZEROES,
        features::VERSION_1,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    assert_eq!(f & feature::RO, 0);
    assert_eq!(d.dev.device_type(), 2);
    assert_eq!(d.dev.queue_max_sizes(), &[256; 4]);
    assert_eq!(config_u64(&d.dev, 0), DISK_SIZE / 512);
    assert_eq!(config_u64(&d.dev, 20) as u32, 512);
    assert_eq!(config_u64(&d.dev, 34) as u16, 4);
    assert_eq!(config_u64(&d.dev, 12) as u32, 254);
    assert_ne!(config_u64(&d.dev, 36) as u32, 0);
    // Reads past the end are zeroes, never a panic.
    let mut b = [0xffu8; 8];
    d.dev.read_config(58, &mut b);
    assert_eq!(b, [0; 8]);
    d.dev.read_config(u64::MAX, &mut b);

    let r = Driver::new(true, 1);
    let f = r.dev.features();
    assert_ne!(f & feature::RO, 0);
    assert_eq!(f & (feature::DISCARD | feature::WRITE_ZEROES), 0);
}

#[test]
fn write_flush_read_round_trip() {
    let mut d = Driver::new(false, 1);
    d.fill(4096, 0xa5);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, 1, 4096), (status::OK, 1));
    assert_eq!(d.simple(b::VIRTIO_BLK_T_FLUSH), (status::OK, 1));
    assert_eq!(d.file(512, 4096), vec![0xa5; 4096]);
    assert_eq!(d.file(0, 512), vec![0; 512]);
    assert_eq!(d.file(4608, 512), vec![0; 512]);
    d.fill(8192, 0);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 0, 8192), (status::OK, 8193));
    let data = d.data(8192);
    assert_eq!(data[..512], [0; 512]);
    assert_eq!(data[512..4608], [0xa5; 4096]);
    assert_eq!(data[4608..], [0; 3584]);
    // The last sector is readable and writable; scattered buffers work.
    d.image
        .as_file()
        .write_all_at(b"tail", DISK_SIZE - 512)
        .unwrap();
    d.header(b::VIRTIO_BLK_T_IN, DISK_SIZE / 512 - 1);
    let r = d.submit_on(
        0,
        &[
            (HDR, 16, false),
            (DATA, 3, true),
            (DATA + 0x1000, 509, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(r, Some((status::OK, 513)));
    assert_eq!(d.data(3), b"tai");
    let mut l = [0u8; 1];
    d.mem()
        .read_slice(&mut l, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(&l, b"l");
}

#[test]
fn get_id_returns_the_serial() {
    let mut d = Driver::new(false, 1);
    d.fill(20, 0xff);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_GET_ID, 0, 20), (status::OK, 21));
    let id = d.data(20);
    assert_eq!(&id[..9], b"test-disk");
    assert_eq!(id[9..], [0; 11]);
    // A short buffer gets what fits.
    assert_eq!(d.rw(b::VIRTIO_BLK_T_GET_ID, 0, 4), (status::OK, 5));
    assert_eq!(
        serial_for("/a/very-long-image-file-name.raw".as_ref(), None),
        *b"-image-file-name.raw"
    );
    assert_eq!(
        &serial_for("/x/disk.img".as_ref(), None)[..9],
        b"disk.img\0"
    );
}

#[test]
fn discard_and_write_zeroes() {
    let mut d = Driver::new(false, 1);
    d.image.as_file().write_all_at(&[0x5a; 16384], 0).unwrap();
    // Write zeroes over sectors 2..6, with and without unmap.
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_WRITE_ZEROES, &[(2, 2, 0), (4, 2, 1)]),
        (status::OK, 1)
    );
    assert_eq!(d.file(1024, 2048), vec![0; 2048]);
    assert_eq!(d.file(512, 512), vec![0x5a; 512]);
    assert_eq!(d.file(3072, 512), vec![0x5a; 512]);
    // Discard of the first 8 KiB; the image keeps its size.
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_DISCARD, &[(0, 16, 0)]),
        (status::OK, 1)
    );
    assert_eq!(d.image.as_file().metadata().unwrap().len(), DISK_SIZE);
    assert_eq!(d.file(8192, 512), vec![0x5a; 512]);
    // Out of range, unknown flags, too many segments, empty: refused, nothing touched.
    let last = DISK_SIZE / 512;
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0), (last, 1, 0)])
            .0,
        status::IOERR
    );
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX / 2, 2, 0)])
            .0,
        status::IOERR
    );
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_DISCARD, &[(16, 1, 1)]).0,
        status::UNSUPP
    );
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_WRITE_ZEROES, &[(16, 1, 2)]).0,
        status::UNSUPP
    );
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_DISCARD, &[(16, 1, 0); 33]).0,
        status::IOERR
    );
    assert_eq!(d.ranges(b::VIRTIO_BLK_T_DISCARD, &[]).0, status::IOERR);
    assert_eq!(d.file(8192, 512), vec![0x5a; 512]);
}

#[test]
fn readonly_refuses_writes() {
    let img = image();
    img.as_file().write_all_at(&[7; 512], 512).unwrap();
    let mut d = Driver::with_image(img, true, 1);
    d.fill(512, 1);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, 1, 512).0, status::IOERR);
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_DISCARD, &[(1, 1, 0)]).0,
        status::UNSUPP
    );
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_WRITE_ZEROES, &[(1, 1, 0)]).0,
        status::UNSUPP
    );
    assert_eq!(d.file(512, 512), vec![7; 512]);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 1, 512), (status::OK, 513));
    assert_eq!(d.data(512), vec![7; 512]);
    assert_eq!(d.simple(b::VIRTIO_BLK_T_FLUSH).0, status::OK);
}

#[test]
fn out_of_range_and_odd_lengths_get_ioerr() {
    let mut d = Driver::new(false, 1);
    let sectors = DISK_SIZE / 512;
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, sectors, 512).0, status::IOERR);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, sectors - 1, 1024).0, status::IOERR);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, sectors, 512).0, status::IOERR);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, u64::MAX, 512).0, status::IOERR);
    assert_eq!(
        d.rw(b::VIRTIO_BLK_T_IN, u64::MAX / 512, 512).0,
        status::IOERR
    );
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, 0, 100).0, status::IOERR);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 0, 511).0, status::IOERR);
    assert_eq!(d.simple(0x1234), (status::UNSUPP, 1));
    // Nothing was written past the end of the image.
    assert_eq!(d.image.as_file().metadata().unwrap().len(), DISK_SIZE);
    // Still serving.
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 0, 512).0, status::OK);
    assert!(!d.irq.needs_reset());
}

#[test]
fn malformed_requests_get_ioerr() {
    let mut d = Driver::new(false, 1);
    d.header(b::VIRTIO_BLK_T_IN, 0);
    // Short header.
    assert_eq!(
        d.submit_on(0, &[(HDR, 8, false), (STATUS, 1, true)])
            .map(|r| r.0),
        Some(status::IOERR)
    );
    // Data in the wrong direction: a read into device-readable memory, a write from
    // device-writable memory, a flush with data.
    let wrong = [
        (b::VIRTIO_BLK_T_IN, false),
        (b::VIRTIO_BLK_T_GET_ID, false),
        (b::VIRTIO_BLK_T_OUT, true),
        (b::VIRTIO_BLK_T_FLUSH, true),
        (b::VIRTIO_BLK_T_DISCARD, true),
    ];
    d.fill(512, 9);
    for (t, write) in wrong {
        d.header(t, 0);
        let r = d.submit_on(
            0,
            &[(HDR, 16, false), (DATA, 512, write), (STATUS, 1, true)],
        );
        assert_eq!(r, Some((status::IOERR, 1)), "type {t}");
    }
    assert_eq!(d.data(512), vec![9; 512]);
    assert_eq!(d.file(0, 512), vec![0; 512]);
    // Readable after writable.
    d.header(b::VIRTIO_BLK_T_IN, 0);
    let r = d.submit_on(
        0,
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA, 16, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(r.map(|r| r.0), Some(status::IOERR));
    assert!(!d.irq.needs_reset());
}

#[test]
fn broken_chains_set_needs_reset() {
    // Status byte not writable.
    let mut d = Driver::new(false, 1);
    d.header(b::VIRTIO_BLK_T_IN, 0);
    assert!(
        d.submit_on(0, &[(HDR, 16, false), (STATUS, 1, false)])
            .is_none()
    );
    assert!(d.irq.needs_reset());
    // Data outside guest memory.
    let mut d = Driver::new(false, 1);
    d.header(b::VIRTIO_BLK_T_IN, 0);
    assert!(
        d.submit_on(
            0,
            &[
                (HDR, 16, false),
                (MEM_SIZE as u64 - 256, 512, true),
                (STATUS, 1, true)
            ]
        )
        .is_none()
    );
    assert!(d.irq.needs_reset());
    assert_eq!(d.file(0, 512), vec![0; 512]);
    // Absurd length wrapping the address space.
    let mut d = Driver::new(false, 1);
    d.header(b::VIRTIO_BLK_T_OUT, 0);
    assert!(
        d.submit_on(
            0,
            &[
                (HDR, 16, false),
                (u64::MAX - 16, u32::MAX, false),
                (STATUS, 1, true)
            ]
        )
        .is_none()
    );
    assert!(d.irq.needs_reset());
    // A descriptor loop.
    let mut d = Driver::new(false, 1);
    d.header(b::VIRTIO_BLK_T_IN, 0);
    d.write_desc(0, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
    d.write_desc(0, 1, DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0);
    let (_, avail, _) = rings(0);
    d.mem().write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    d.events[0].write(1).unwrap();
    let start = Instant::now();
    while !d.irq.needs_reset() && start.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(d.irq.needs_reset());
    // Reset and a fresh start recover.
    d.dev.reset();
    d.irq.reset();
    d.mem()
        .write_slice(&[0u8; 0x4000], GuestAddress(rings(0).0))
        .unwrap();
    d.avail[0] = 0;
    d.start(features::VERSION_1);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 0, 512).0, status::OK);
}

#[test]
fn every_queue_is_served() {
    let mut d = Driver::new(false, 3);
    for q in 0..3usize {
        d.fill(512, q as u8 + 1);
        d.header(b::VIRTIO_BLK_T_OUT, q as u64);
        let r = d.submit_on(
            q,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(r, Some((status::OK, 1)), "queue {q}");
        assert_eq!(d.file(512 * q as u64, 512), vec![q as u8 + 1; 512]);
    }
}

#[test]
fn writable_images_are_locked() {
    let img = image();
    let _first = RawFile::open(img.path(), false).unwrap();
    let e = RawFile::open(img.path(), false).unwrap_err();
    assert!(matches!(e, DiskError::Locked { .. }), "{e}");
    assert!(
        e.to_string().contains(&img.path().display().to_string()),
        "{e}"
    );
    // A read-only user cannot share a writer's image either.
    assert!(matches!(
        RawFile::open(img.path(), true),
        Err(DiskError::Locked { .. })
    ));
    drop(_first);
    let _r1 = RawFile::open(img.path(), true).unwrap();
    let _r2 = RawFile::open(img.path(), true).unwrap();
    assert!(RawFile::open(img.path(), false).is_err());
    // Missing and empty files.
    let e = RawFile::open("/nonexistent/disk.img".as_ref(), false).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    let empty = tempfile::NamedTempFile::new().unwrap();
    assert!(matches!(
        RawFile::open(empty.path(), false),
        Err(DiskError::Empty { .. })
    ));
    assert!(matches!(
        RawFile::open("/tmp".as_ref(), true),
        Err(DiskError::NotAFile { .. }) | Err(DiskError::Open { .. })
    ));
}
