//! virtio-blk against a temporary raw image, driven by a test driver that lays requests out in
//! split rings in guest memory as a guest would, and notifies through the queue eventfds. Most
//! tests run on both I/O engines (io_uring and synchronous).

mod bench;
mod driver;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk as b;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::{Block, DiskError, IoEngine, RawFile, feature, serial_for, status};
use crate::virtio::{CounterSet, VirtioDevice, features};

use driver::{
    DATA, DISK_SIZE, Driver, ENGINES, HDR, MEM_SIZE, QSIZE, Req, STATUS, TIMEOUT, batch_data,
    image, rings, uring_available,
};

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
    for engine in ENGINES {
        write_flush_read_round_trip_on(engine);
    }
}

fn write_flush_read_round_trip_on(engine: IoEngine) {
    let mut d = Driver::on(engine, false, 1);
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
    for engine in ENGINES {
        get_id_returns_the_serial_on(engine);
    }
}

fn get_id_returns_the_serial_on(engine: IoEngine) {
    let mut d = Driver::on(engine, false, 1);
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
    for engine in ENGINES {
        discard_and_write_zeroes_on(engine);
    }
}

fn discard_and_write_zeroes_on(engine: IoEngine) {
    let mut d = Driver::on(engine, false, 1);
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
    for engine in ENGINES {
        readonly_refuses_writes_on(engine);
    }
}

fn readonly_refuses_writes_on(engine: IoEngine) {
    let img = image();
    img.as_file().write_all_at(&[7; 512], 512).unwrap();
    let mut d = Driver::with_image(img, engine, true, 1);
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
    for engine in ENGINES {
        out_of_range_and_odd_lengths_get_ioerr_on(engine);
    }
}

fn out_of_range_and_odd_lengths_get_ioerr_on(engine: IoEngine) {
    let mut d = Driver::on(engine, false, 1);
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
    for engine in ENGINES {
        malformed_requests_get_ioerr_on(engine);
    }
}

fn malformed_requests_get_ioerr_on(engine: IoEngine) {
    let mut d = Driver::on(engine, false, 1);
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
    for engine in ENGINES {
        broken_chains_set_needs_reset_on(engine);
    }
}

fn broken_chains_set_needs_reset_on(engine: IoEngine) {
    // Status byte not writable.
    let mut d = Driver::on(engine, false, 1);
    d.header(b::VIRTIO_BLK_T_IN, 0);
    assert!(
        d.submit_on(0, &[(HDR, 16, false), (STATUS, 1, false)])
            .is_none()
    );
    assert!(d.irq.needs_reset());
    // Data outside guest memory.
    let mut d = Driver::on(engine, false, 1);
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
    let mut d = Driver::on(engine, false, 1);
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
    let mut d = Driver::on(engine, false, 1);
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
    for engine in ENGINES {
        every_queue_is_served_on(engine);
    }
}

fn every_queue_is_served_on(engine: IoEngine) {
    let mut d = Driver::on(engine, false, 3);
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

#[test]
fn many_requests_in_flight_complete_out_of_order() {
    for engine in ENGINES {
        let mut d = Driver::on(engine, false, 1);
        for blk in 16..32u64 {
            d.image
                .as_file()
                .write_all_at(&[blk as u8; 4096], blk * 4096)
                .unwrap();
        }
        // 15 writes, a FLUSH, then 16 reads, all made available at once.
        let mut reqs = Vec::new();
        for i in 0..15 {
            d.mem()
                .write_slice(&[0x80 + i as u8; 4096], GuestAddress(batch_data(i)))
                .unwrap();
            reqs.push(Req {
                t: b::VIRTIO_BLK_T_OUT,
                sector: 8 * i as u64,
                len: 4096,
            });
        }
        const FLUSH: usize = 15;
        reqs.push(Req {
            t: b::VIRTIO_BLK_T_FLUSH,
            sector: 0,
            len: 0,
        });
        for i in 16..32 {
            reqs.push(Req {
                t: b::VIRTIO_BLK_T_IN,
                sector: 8 * i as u64,
                len: 4096,
            });
        }
        let used = d.batch(0, &reqs).expect("batch not completed");
        let mut heads: Vec<u16> = used.iter().map(|u| u.0).collect();
        heads.sort_unstable();
        assert_eq!(heads, (0..32).map(|i| 3 * i).collect::<Vec<u16>>());
        let pos = |i: usize| used.iter().position(|u| u.0 == 3 * i as u16).unwrap();
        for i in 0..32 {
            assert_eq!(d.batch_status(i), status::OK, "{engine:?} request {i}");
        }
        for i in 0..15 {
            assert_eq!(used[pos(i)].1, 1);
            assert_eq!(d.file(4096 * i as u64, 4096), vec![0x80 + i as u8; 4096]);
        }
        for i in 16..32 {
            assert_eq!(used[pos(i)].1, 4097);
            assert_eq!(d.batch_data(i, 4096), vec![i as u8; 4096]);
        }
        // The flush completed after every write made available before it.
        assert!((0..15).all(|i| pos(i) < pos(FLUSH)), "{engine:?}: {used:?}");
        let c = d.dev.counters();
        assert_eq!(
            (c.write_ops.get(), c.write_bytes.get(), c.flush_ops.get()),
            (15, 15 * 4096, 1),
            "{engine:?}"
        );
        assert_eq!((c.read_ops.get(), c.read_bytes.get()), (16, 16 * 4096));
        match d.expect {
            IoEngine::Sync => assert!((0..32).all(|i| pos(i) == i), "{used:?}"),
            // The reads after the flush did not wait for its fdatasync: they were in flight
            // together, and completed first.
            IoEngine::Uring => assert!((16..32).any(|i| pos(i) < pos(FLUSH)), "{used:?}"),
        }
        assert!(!d.irq.needs_reset());
    }
}

#[test]
fn writes_then_flush_then_read_back_in_one_batch() {
    for engine in ENGINES {
        let mut d = Driver::on(engine, false, 2);
        // On queue 1, so the second queue's ring is used too.
        let mut reqs = Vec::new();
        for i in 0..8 {
            d.mem()
                .write_slice(&[i as u8 + 1; 8192], GuestAddress(batch_data(i)))
                .unwrap();
            reqs.push(Req {
                t: b::VIRTIO_BLK_T_OUT,
                sector: 16 * i as u64,
                len: 8192,
            });
        }
        reqs.push(Req {
            t: b::VIRTIO_BLK_T_FLUSH,
            sector: 0,
            len: 0,
        });
        let used = d.batch(1, &reqs).expect("writes not completed");
        assert_eq!(
            used.last().map(|u| u.0),
            Some(3 * 8),
            "{engine:?}: {used:?}"
        );
        assert!((0..9).all(|i| d.batch_status(i) == status::OK));
        let reads: Vec<Req> = (0..8)
            .map(|i| Req {
                t: b::VIRTIO_BLK_T_IN,
                sector: 16 * (7 - i) as u64,
                len: 8192,
            })
            .collect();
        for i in 0..8 {
            d.mem()
                .write_slice(&[0; 8192], GuestAddress(batch_data(i)))
                .unwrap();
        }
        d.batch(1, &reads).expect("reads not completed");
        for i in 0..8 {
            assert_eq!(d.batch_status(i), status::OK);
            assert_eq!(d.batch_data(i, 8192), vec![8 - i as u8; 8192], "{engine:?}");
        }
        assert_eq!(d.file(0, 8192), vec![1; 8192]);
    }
}

#[test]
fn writes_are_written_through_without_flush() {
    for engine in ENGINES {
        let mut d = Driver::on(engine, false, 1);
        d.dev.reset();
        d.start(d.dev.features() & !feature::FLUSH & !features::RING_EVENT_IDX);
        d.fill(4096, 0x42);
        assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, 8, 4096), (status::OK, 1));
        assert_eq!(d.file(4096, 4096), vec![0x42; 4096]);
        assert_eq!(d.file(0, 4096), vec![0; 4096]);
    }
}

#[test]
fn a_read_past_the_end_of_a_shrunk_image_gets_ioerr() {
    for engine in ENGINES {
        let mut d = Driver::on(engine, false, 1);
        d.image
            .as_file()
            .write_all_at(&[3; 4096], DISK_SIZE - 4096)
            .unwrap();
        // The image is truncated under the running device: its last 4 KiB now straddle the end
        // of the file. A read there is short (2 KiB), the rest reads nothing: IOERR, not OK.
        d.image.as_file().set_len(DISK_SIZE - 2048).unwrap();
        let last_4k = (DISK_SIZE - 4096) / 512;
        assert_eq!(
            d.rw(b::VIRTIO_BLK_T_IN, last_4k, 4096),
            (status::IOERR, 1),
            "{engine:?}"
        );
        // Entirely past the end.
        assert_eq!(
            d.rw(b::VIRTIO_BLK_T_IN, DISK_SIZE / 512 - 1, 512),
            (status::IOERR, 1)
        );
        // What is still there reads fine.
        d.fill(2048, 0);
        assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, last_4k, 2048), (status::OK, 2049));
        assert_eq!(d.data(2048), vec![3; 2048]);
        assert!(!d.irq.needs_reset());
    }
}

#[test]
fn one_chain_posted_many_times_while_in_flight() {
    // A hostile driver makes the same chain available again and again, so one buffer is the
    // target of many reads at once and more chains arrive while the ring is full.
    for engine in ENGINES {
        let mut d = Driver::on(engine, false, 1);
        d.image.as_file().write_all_at(&[7; 4096], 0).unwrap();
        let head = d.prepare(
            0,
            0,
            Req {
                t: b::VIRTIO_BLK_T_IN,
                sector: 0,
                len: 4096,
            },
        );
        for _ in 0..QSIZE {
            d.post(0, head);
        }
        d.events[0].write(1).unwrap();
        // Once half are used the device has taken at least half (with io_uring: all, as it
        // takes every chain before it reaps); post more while the rest may still run.
        let start = Instant::now();
        while d.used_idx(0) < QSIZE / 2 && start.elapsed() < TIMEOUT {
            std::thread::yield_now();
        }
        for _ in 0..QSIZE / 2 {
            d.post(0, head);
        }
        d.events[0].write(1).unwrap();
        assert!(d.wait_all_used(0), "{engine:?}");
        assert_eq!(d.used_idx(0), QSIZE + QSIZE / 2);
        assert_eq!(d.batch_status(0), status::OK);
        assert_eq!(d.batch_data(0, 4096), vec![7; 4096]);
        assert!(!d.irq.needs_reset());
    }
}

fn block_counts(pairs: [(&str, u64); 8]) -> BTreeMap<String, u64> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[test]
fn counters_count_completed_requests_exactly() {
    for engine in ENGINES {
        counters_count_completed_requests_exactly_on(engine);
    }
}

fn counters_count_completed_requests_exactly_on(engine: IoEngine) {
    let mut d = Driver::on(engine, false, 1);
    let c = d.dev.counters();
    let ok = |errors| {
        block_counts([
            ("read_bytes", 8192),
            ("write_bytes", 4096),
            ("read_ops", 1),
            ("write_ops", 1),
            ("flush_ops", 1),
            ("discard_ops", 1),
            ("write_zeroes_ops", 1),
            ("errors", errors),
        ])
    };
    d.fill(4096, 0x3c);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, 1, 4096), (status::OK, 1));
    assert_eq!(d.simple(b::VIRTIO_BLK_T_FLUSH), (status::OK, 1));
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 0, 8192).0, status::OK);
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_DISCARD, &[(64, 8, 0)]).0,
        status::OK
    );
    assert_eq!(
        d.ranges(b::VIRTIO_BLK_T_WRITE_ZEROES, &[(80, 8, 0), (96, 8, 1)])
            .0,
        status::OK
    );
    // Neither data nor a failure.
    assert_eq!(d.rw(b::VIRTIO_BLK_T_GET_ID, 0, 20).0, status::OK);
    assert_eq!(d.simple(0x1234).0, status::UNSUPP);
    assert_eq!(c.snapshot(), ok(0), "{engine:?}");

    // Refused requests are errors and move no data: out of range, data in the wrong direction
    // (a "read" whose buffer the device may only read), a short header.
    let sectors = DISK_SIZE / 512;
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, sectors, 4096).0, status::IOERR);
    d.header(b::VIRTIO_BLK_T_IN, 0);
    let r = d.submit_on(
        0,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
    );
    assert_eq!(r, Some((status::IOERR, 1)));
    d.header(b::VIRTIO_BLK_T_OUT, 0);
    let r = d.submit_on(
        0,
        &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
    );
    assert_eq!(r, Some((status::IOERR, 1)));
    let r = d.submit_on(0, &[(HDR, 8, false), (STATUS, 1, true)]);
    assert_eq!(r, Some((status::IOERR, 1)));
    assert_eq!(c.snapshot(), ok(4), "{engine:?}");

    // A hostile chain that breaks the queue (its data runs outside guest memory) completes
    // nothing, so counts nothing.
    d.header(b::VIRTIO_BLK_T_IN, 0);
    let r = d.submit_on(
        0,
        &[
            (HDR, 16, false),
            (MEM_SIZE as u64 - 256, 4096, true),
            (STATUS, 1, true),
        ],
    );
    assert!(r.is_none() && d.irq.needs_reset());
    assert_eq!(c.snapshot(), ok(4), "{engine:?}");

    // The counts outlive a driver reset; a read-only disk's refused write is an error too.
    d.dev.reset();
    assert_eq!(c.snapshot(), ok(4));
    let mut r = Driver::on(engine, true, 1);
    assert_eq!(r.rw(b::VIRTIO_BLK_T_OUT, 0, 512).0, status::IOERR);
    let rc = r.dev.counters();
    assert_eq!(
        (rc.write_ops.get(), rc.write_bytes.get(), rc.errors.get()),
        (0, 0, 1)
    );
}

/// A disk in memory: a backend with no file to do direct I/O on (like qcow2).
struct MemDisk(std::sync::Mutex<Vec<u8>>);

impl super::DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> std::io::Result<()> {
        self.write_at(&vec![0; len as usize], offset)
    }
}

#[test]
fn backends_without_a_direct_file_stay_synchronous() {
    let disk = Arc::new(MemDisk(std::sync::Mutex::new(vec![0; 64 << 10])));
    let dev = Block::new(disk.clone(), false, 1, [0; 20]).with_io_engine(IoEngine::Uring);
    let mut d = Driver::with_block(dev, IoEngine::Sync, image(), 1);
    d.fill(1024, 0x11);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, 4, 1024), (status::OK, 1));
    assert_eq!(disk.0.lock().unwrap()[2048..3072], [0x11; 1024]);
    assert_eq!(d.simple(b::VIRTIO_BLK_T_FLUSH), (status::OK, 1));
    d.fill(1024, 0);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 4, 1024), (status::OK, 1025));
    assert_eq!(d.data(1024), vec![0x11; 1024]);
}

/// Runs `f` on a thread where `io_uring_setup` fails with ENOSYS, as on a kernel without
/// io_uring or under a seccomp policy that forbids it; threads it starts inherit the filter.
fn without_io_uring<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        };
        let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
        let ret = libc::BPF_RET | libc::BPF_K;
        // seccomp_data: nr at offset 0, arch at 4.
        let mut filter = [
            stmt(load, 4),
            jump(AUDIT_ARCH_X86_64, 0, 3),
            stmt(load, 0),
            jump(libc::SYS_io_uring_setup as u32, 0, 1),
            stmt(ret, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
            stmt(ret, libc::SECCOMP_RET_ALLOW),
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: prctl with plain integer arguments, on this thread only.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        assert_eq!(r, 0);
        // SAFETY: `prog` points at `filter`, both alive for the call; the kernel copies them.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        };
        assert_eq!(r, 0, "seccomp: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn a_kernel_refusing_io_uring_falls_back_to_synchronous_io() {
    let mut d = without_io_uring(|| {
        assert!(!uring_available());
        Driver::on(IoEngine::Uring, false, 2)
    });
    assert_eq!(d.dev.io_engine(), Some(IoEngine::Sync));
    d.fill(4096, 0x5c);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_OUT, 2, 4096), (status::OK, 1));
    assert_eq!(d.simple(b::VIRTIO_BLK_T_FLUSH), (status::OK, 1));
    assert_eq!(d.file(1024, 4096), vec![0x5c; 4096]);
    d.fill(4096, 0);
    assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, 2, 4096), (status::OK, 4097));
    assert_eq!(d.data(4096), vec![0x5c; 4096]);
    // Hostile chains are still refused on this path.
    d.header(b::VIRTIO_BLK_T_IN, 0);
    assert!(
        d.submit_on(0, &[(HDR, 16, false), (STATUS, 1, false)])
            .is_none()
    );
    assert!(d.irq.needs_reset());
}

#[test]
fn event_idx_suppresses_interrupts_until_the_driver_asks() {
    for engine in ENGINES {
        let mut d = Driver::on(engine, false, 1);
        d.dev.reset();
        d.start(d.dev.features());
        let _ = d.interrupts();
        // used_event (after the avail ring): interrupt only when the used index passes 2, i.e.
        // for the third of five requests done one after another.
        let used_event = GuestAddress(rings(0).1 + 4 + 2 * u64::from(QSIZE));
        d.mem().write_obj(2u16, used_event).unwrap();
        for n in 1..=5 {
            assert_eq!(d.rw(b::VIRTIO_BLK_T_IN, n, 512).0, status::OK);
        }
        // The device signals right after it updates the used ring: wait for the one interrupt,
        // then a little for any wrong extra one.
        let mut total = 0;
        let start = Instant::now();
        while total == 0 && start.elapsed() < TIMEOUT {
            total += d.wait_interrupt();
        }
        std::thread::sleep(Duration::from_millis(20));
        total += d.interrupts();
        assert_eq!(total, 1, "{engine:?}");
    }
}
