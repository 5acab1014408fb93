//! A benchmark of the two I/O engines through the test driver (ignored by default).

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use virtio_bindings::virtio_blk as b;

use super::super::{Block, IoEngine, status};
use super::driver::{Driver, Req, image, uring_available};

/// Random 4 KiB reads with 32 requests in flight, synchronous vs io_uring, on a 256 MiB image
/// in `$BENCH_DIR` (default: the temp directory), with the image's page cache dropped first
/// (`cold`: the disk's latency) and kept (`warm`: the device's own cost); five interleaved runs
/// each, median and best printed. Run with
/// `cargo test -p hyperpool-devices --release -- --ignored --nocapture depth_32`.
#[test]
#[ignore = "benchmark; prints figures"]
fn bench_random_4k_reads_at_depth_32() {
    const IMAGE: u64 = 256 << 20;
    const READS: usize = 4096;
    const DEPTH: usize = 32;
    let dir = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let img = tempfile::NamedTempFile::new_in(&dir).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + 1) as u8).collect();
    for off in (0..IMAGE).step_by(chunk.len()) {
        img.as_file().write_all_at(&chunk, off).unwrap();
    }
    img.as_file().sync_all().unwrap();
    // A fixed pseudo-random sequence of 4 KiB blocks (xorshift), the same for every run.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let sectors: Vec<u64> = (0..READS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (IMAGE / 4096)) * 8
        })
        .collect();
    const RUNS: usize = 5;
    let mut times = vec![Vec::new(); 4];
    for _ in 0..RUNS {
        for (n, (cold, engine)) in [
            (true, IoEngine::Uring),
            (true, IoEngine::Sync),
            (false, IoEngine::Uring),
            (false, IoEngine::Sync),
        ]
        .into_iter()
        .enumerate()
        {
            if cold {
                // SAFETY: posix_fadvise on a file descriptor we own; no memory is involved.
                let r = unsafe {
                    libc::posix_fadvise(img.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                };
                assert_eq!(r, 0);
            }
            let dev = Block::open_raw(img.path(), true, 1, None)
                .unwrap()
                .with_io_engine(engine);
            let expect = match engine {
                IoEngine::Uring if !uring_available() => IoEngine::Sync,
                e => e,
            };
            let mut d = Driver::with_block(dev, expect, image(), 1);
            let read = |n: usize| Req {
                t: b::VIRTIO_BLK_T_IN,
                sector: sectors[n],
                len: 4096,
            };
            let start = Instant::now();
            let mut next = 0;
            for i in 0..DEPTH {
                let head = d.prepare(0, i, read(next));
                d.post(0, head);
                next += 1;
            }
            d.events[0].write(1).unwrap();
            let (mut seen, mut done) = (0u16, 0usize);
            while done < READS {
                let used = d.used_idx(0);
                if used == seen {
                    assert!(!d.irq.needs_reset());
                    let _ = d.wait_interrupt();
                    continue;
                }
                while seen != used {
                    let (head, len) = d.used_entry(0, seen);
                    seen = seen.wrapping_add(1);
                    done += 1;
                    let i = usize::from(head / 3);
                    assert_eq!((d.batch_status(i), len), (status::OK, 4097));
                    if next < READS {
                        let head = d.prepare(0, i, read(next));
                        d.post(0, head);
                        next += 1;
                    }
                }
                d.events[0].write(1).unwrap();
            }
            assert_eq!(d.dev.io_engine(), Some(expect));
            times[n].push((start.elapsed(), cold, expect));
        }
    }
    for mut t in times {
        t.sort_unstable_by_key(|t| t.0);
        let (median, cold, engine) = t[RUNS / 2];
        println!(
            "{} {engine:?}: {READS} random 4 KiB reads at depth {DEPTH}: median {:.1} ms \
             ({:.0} IOPS), best {:.1} ms",
            if cold { "cold" } else { "warm" },
            median.as_secs_f64() * 1e3,
            READS as f64 / median.as_secs_f64(),
            t[0].0.as_secs_f64() * 1e3,
        );
    }
}
