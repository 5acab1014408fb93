//! The `bench-blk` check: block I/O throughput of the first modern virtio-blk function, driven
//! from ring 3 through a [`RawQueue`] (see `vring.rs` for why), polled, no interrupts.
//!
//! Three timed phases of `bench.ms` each (default 2000), over the first `bench.blk.mib` MiB
//! of the disk (default 1024, at most the disk):
//! 1. `seqwrite1m`: 1 MiB writes in order at queue depth `bench.blk.seq_qd` (default 8),
//!    wrapping at the end of the region. Every 4 KiB block written at disk offset `o` holds
//!    `o ^ MAGIC` in its first 8 bytes and `FILL ^ j` in its 8-byte word `j` (1..512).
//! 2. `seqread1m`: 1 MiB reads in order at the same depth over what phase 1 covered.
//! 3. `randread4k`: 4 KiB reads at uniformly random block offsets in that range at queue depth
//!    `bench.blk.qd` (default 32).
//!
//! Reads check the first and last word of the first and last block of every request, and after
//! each read phase the last buffer of every slot is checked word by word: any mismatch, any
//! request whose status is not OK, or a device that stops completing requests fails the check.
//! Phase time runs from the first submission to the last completion (in-flight requests are
//! drained after `bench.ms`). FLUSH is negotiated so writes are not made durable one by one
//! (as with a Linux guest on a write-back disk); no flush is sent.
//!
//! `PROBE bench-blk ok randread4k_qd32_iops=<n> seqread1m_mbps=<n> seqwrite1m_mbps=<n>`
//! (MB = 10^6 bytes; the queue depth in the first name is the one used).

use crate::arena;
use crate::cmdline;
use crate::pvh::StartInfo;
use crate::vring::{self, DESC_F_WRITE, RawQueue};
use crate::{println, time, user, virtio};
use alloc::format;
use alloc::string::String;
use virtio_drivers::transport::pci::VIRTIO_VENDOR_ID;
use virtio_drivers::transport::{DeviceStatus, Transport};

/// Modern virtio-blk PCI device id (0x1040 + 2).
const BLK_MODERN: u16 = 0x1042;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const SECTOR: u64 = 512;
const BLOCK: u64 = 4096;
const WORDS: usize = (BLOCK / 8) as usize;
const SEQ_BS: u64 = 1 << 20;
const RAND_BS: u64 = BLOCK;
/// Most requests in flight (three descriptors each).
const MAX_SLOTS: usize = 64;
const QUEUE_SIZE: u16 = 256;
/// First word of a block: its disk offset XOR this ("HPBENCH!").
pub const MAGIC: u64 = 0x4850_4245_4e43_4821;
/// Word `j` (1..512) of every block: this XOR `j`.
pub const FILL: u64 = 0x9e37_79b9_7f4a_7c15;
/// After `bench.ms`, in-flight requests must complete within this.
const DRAIN_TIMEOUT_US: u64 = 10_000_000;
/// Arena layout: queue, then request headers, then status bytes; data from 2 MiB on.
const HEADERS_AT: u64 = 64 << 10;
const STATUS_AT: u64 = 72 << 10;
const DATA_AT: u64 = 2 << 20;

/// Ring-3 return codes.
const DONE: u64 = 0;
const STUCK: u64 = 1;
const BAD_ID: u64 = 2;

/// One timed phase, shared with the ring-3 loop by pointer.
#[repr(C)]
struct Phase {
    q: *mut RawQueue,
    write: bool,
    random: bool,
    slots: u64,
    bs: u64,
    /// Bytes of the disk the phase works in (from offset 0).
    extent: u64,
    headers: u64,
    status: u64,
    data: u64,
    run_ticks: u64,
    drain_ticks: u64,
    rng: u64,
    cursor: u64,
    wrapped: bool,
    // Results.
    done: u64,
    elapsed: u64,
    io_errors: u64,
    bad: u64,
    first_bad: u64,
    bad_id: u32,
    /// Disk offset of each slot's current request.
    offsets: [u64; MAX_SLOTS],
}

impl Phase {
    fn buf(&self, slot: u64) -> u64 {
        self.data + slot * self.bs
    }

    fn next_offset(&mut self) -> u64 {
        if self.random {
            // xorshift64
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            return (self.rng % (self.extent / self.bs)) * self.bs;
        }
        let at = self.cursor;
        self.cursor += self.bs;
        if self.cursor + self.bs > self.extent {
            self.cursor = 0;
            self.wrapped = true;
        }
        at
    }

    /// The disk bytes a sequential write phase has filled with the pattern.
    fn covered(&self) -> u64 {
        if self.wrapped {
            self.extent
        } else {
            self.cursor
        }
    }

    fn word(addr: u64) -> u64 {
        // SAFETY: callers pass addresses inside this phase's data buffers (arena RAM).
        unsafe { (addr as *const u64).read_volatile() }
    }

    /// First and last word of the first and last block of a slot's buffer.
    fn quick_check(&self, slot: u64, offset: u64) -> bool {
        let buf = self.buf(slot);
        let last = self.bs - BLOCK;
        let fill_last = FILL ^ (WORDS as u64 - 1);
        Self::word(buf) == offset ^ MAGIC
            && Self::word(buf + BLOCK - 8) == fill_last
            && Self::word(buf + last) == (offset + last) ^ MAGIC
            && Self::word(buf + last + BLOCK - 8) == fill_last
    }

    /// Every word of a slot's buffer; the first bad disk offset.
    fn full_check(&self, slot: u64, offset: u64) -> Result<(), u64> {
        let buf = self.buf(slot);
        for b in (0..self.bs).step_by(BLOCK as usize) {
            for j in 0..WORDS as u64 {
                let want = if j == 0 {
                    (offset + b) ^ MAGIC
                } else {
                    FILL ^ j
                };
                if Self::word(buf + b + 8 * j) != want {
                    return Err(offset + b + 8 * j);
                }
            }
        }
        Ok(())
    }

    fn submit(&mut self, q: &mut RawQueue, slot: u64) {
        let offset = self.next_offset();
        let h = self.headers + 16 * slot;
        // SAFETY: header, status byte and data buffer of `slot` are this phase's arena memory,
        // not in use by the device (the slot's previous request has completed).
        unsafe {
            (h as *mut u32).write_volatile(if self.write { T_OUT } else { T_IN });
            ((h + 4) as *mut u32).write_volatile(0);
            ((h + 8) as *mut u64).write_volatile(offset / SECTOR);
            ((self.status + slot) as *mut u8).write_volatile(0xff);
            if self.write {
                let buf = self.buf(slot);
                for b in (0..self.bs).step_by(BLOCK as usize) {
                    ((buf + b) as *mut u64).write_volatile((offset + b) ^ MAGIC);
                }
            }
        }
        if let Some(o) = self.offsets.get_mut(slot as usize) {
            *o = offset;
        }
        q.push((3 * slot) as u16);
    }

    /// Descriptors (header, data, status per slot) and, for writes, the fill pattern.
    fn prepare(&mut self, q: &mut RawQueue) {
        for s in 0..self.slots {
            let d = (3 * s) as u16;
            let dir = if self.write { 0 } else { DESC_F_WRITE };
            q.set_desc(d, self.headers + 16 * s, 16, 0, Some(d + 1));
            q.set_desc(d + 1, self.buf(s), self.bs as u32, dir, Some(d + 2));
            q.set_desc(d + 2, self.status + s, 1, DESC_F_WRITE, None);
            if self.write {
                for b in (0..self.bs).step_by(BLOCK as usize) {
                    for j in 1..WORDS as u64 {
                        // SAFETY: inside slot s's data buffer.
                        unsafe { ((self.buf(s) + b + 8 * j) as *mut u64).write_volatile(FILL ^ j) };
                    }
                }
            }
        }
    }

    /// The timed loop (ring 3).
    fn run(&mut self) -> u64 {
        // SAFETY: ring 0 hands over the queue for the duration of the phase.
        let q = unsafe { &mut *self.q };
        self.prepare(q);
        let start = time::rdtsc();
        let stop = start + self.run_ticks;
        let give_up = stop + self.drain_ticks;
        for s in 0..self.slots {
            self.submit(q, s);
        }
        q.publish();
        let mut last = start;
        loop {
            while let Some((id, _)) = q.pop_used() {
                let slot = u64::from(id / 3);
                if id % 3 != 0 || slot >= self.slots {
                    self.bad_id = id;
                    return BAD_ID;
                }
                last = time::rdtsc();
                // SAFETY: the slot's status byte (arena memory).
                let status = unsafe { ((self.status + slot) as *const u8).read_volatile() };
                let offset = self.offsets.get(slot as usize).copied().unwrap_or(0);
                if status != 0 {
                    self.io_errors += 1;
                } else if !self.write && !self.quick_check(slot, offset) {
                    if self.bad == 0 {
                        self.first_bad = offset;
                    }
                    self.bad += 1;
                }
                self.done += 1;
                if last < stop {
                    self.submit(q, slot);
                }
            }
            q.publish();
            if q.in_flight() == 0 {
                break;
            }
            if time::rdtsc() > give_up {
                return STUCK;
            }
        }
        self.elapsed = last - start;
        if !self.write {
            for s in 0..self.slots {
                let offset = self.offsets.get(s as usize).copied().unwrap_or(0);
                if let Err(at) = self.full_check(s, offset) {
                    if self.bad == 0 {
                        self.first_bad = at;
                    }
                    self.bad += 1;
                }
            }
        }
        DONE
    }
}

extern "C" fn phase_in_ring3(arg: u64) -> u64 {
    // SAFETY: `run_phase` passes a pointer to its live `Phase` and waits for us to return.
    let phase = unsafe { &mut *(arg as *mut Phase) };
    phase.run()
}

/// Options from the command line.
struct Options {
    ms: u64,
    mib: u64,
    qd: u64,
    seq_qd: u64,
}

impl Options {
    fn parse(cmdline: &str) -> Result<Self, String> {
        let max_slots = u64::from(QUEUE_SIZE / 3).min(MAX_SLOTS as u64);
        Ok(Self {
            ms: cmdline::number_in(cmdline, "bench.ms", 2000, 10..=600_000)?,
            mib: cmdline::number_in(cmdline, "bench.blk.mib", 1024, 1..=1 << 20)?,
            qd: cmdline::number_in(cmdline, "bench.blk.qd", 32, 1..=max_slots)?,
            seq_qd: cmdline::number_in(cmdline, "bench.blk.seq_qd", 8, 1..=max_slots)?,
        })
    }
}

/// What one phase measured.
struct Figures {
    ops: u64,
    bytes: u64,
    ticks: u64,
    kicks: u64,
}

impl Figures {
    fn per_second(&self, n: u64, khz: u64) -> u64 {
        (u128::from(n) * u128::from(khz) * 1000 / u128::from(self.ticks.max(1))) as u64
    }
}

/// What a phase does.
#[derive(Clone, Copy)]
struct Spec {
    write: bool,
    random: bool,
    slots: u64,
    bs: u64,
    /// Bytes of the disk it works in, from offset 0.
    extent: u64,
}

/// Runs one phase on `q` for `ms`; returns its figures and, for sequential writes, the bytes
/// covered.
fn run_phase(q: &mut RawQueue, arena: u64, spec: Spec, ms: u64) -> Result<(Figures, u64), String> {
    let kicks_before = q.kicks;
    let Spec {
        write,
        random,
        slots,
        bs,
        extent,
    } = spec;
    let mut p = Phase {
        q: &raw mut *q,
        write,
        random,
        slots,
        bs,
        extent,
        headers: arena + HEADERS_AT,
        status: arena + STATUS_AT,
        data: arena + DATA_AT,
        run_ticks: time::ticks_for_us(ms * 1000),
        drain_ticks: time::ticks_for_us(DRAIN_TIMEOUT_US),
        rng: time::rdtsc() | 1,
        cursor: 0,
        wrapped: false,
        done: 0,
        elapsed: 0,
        io_errors: 0,
        bad: 0,
        first_bad: 0,
        bad_id: 0,
        offsets: [0; MAX_SLOTS],
    };
    let code = user::run(phase_in_ring3, &raw mut p as u64);
    match code {
        DONE => {}
        STUCK => {
            return Err(format!(
                "{} requests still in flight {} s after the phase ended ({} completed)",
                q.in_flight(),
                DRAIN_TIMEOUT_US / 1_000_000,
                p.done
            ));
        }
        BAD_ID => return Err(format!("device returned used id {}", p.bad_id)),
        other => return Err(format!("ring-3 loop ended with {other:#x}")),
    }
    if p.io_errors > 0 {
        return Err(format!("{} of {} requests failed", p.io_errors, p.done));
    }
    if p.bad > 0 {
        return Err(format!(
            "{} reads returned wrong data (first at disk offset {:#x})",
            p.bad, p.first_bad
        ));
    }
    let covered = p.covered();
    Ok((
        Figures {
            ops: p.done,
            bytes: p.done * bs,
            ticks: p.elapsed,
            kicks: q.kicks - kicks_before,
        },
        covered,
    ))
}

/// The `bench-blk` check.
pub fn check(si: &StartInfo, si_paddr: u64, cmdline: &str) -> Result<String, String> {
    let opts = Options::parse(cmdline)?;
    let khz = time::tsc_khz().ok_or("TSC frequency unknown: cannot time the benchmark")?;
    let mut found = virtio::find_id(si.rsdp_paddr, BLK_MODERN)?;
    if found.functions.is_empty() {
        return Err(format!(
            "no virtio 1.x block device ({VIRTIO_VENDOR_ID:04x}:{BLK_MODERN:04x}) on bus 0"
        ));
    }
    let data_bytes = (opts.seq_qd * SEQ_BS).max(opts.qd * RAND_BS);
    let arena = arena::take(si, si_paddr, DATA_AT + data_bytes)?;
    let mut dev = vring::bring_up(&mut found, 0, F_FLUSH)?;
    let df = dev.df;
    let result = (|| {
        // Device configuration: capacity (u64, in 512-byte sectors) at offset 0.
        // (Two 32-bit reads: the transport only promises 4-byte alignment.)
        let word = |at| -> Result<u32, String> {
            dev.transport
                .read_config_space(at)
                .map_err(|e| format!("{df} capacity: {e}"))
        };
        let capacity = u64::from(word(0)?) | u64::from(word(4)?) << 32;
        let region = (capacity * SECTOR).min(opts.mib << 20) / SEQ_BS * SEQ_BS;
        if region < SEQ_BS * opts.seq_qd {
            return Err(format!(
                "{df} capacity {capacity} sectors: needs at least {} MiB",
                opts.seq_qd
            ));
        }
        let mut q = dev.add_queue(0, QUEUE_SIZE, arena)?;
        dev.start();
        let seq = Spec {
            write: true,
            random: false,
            slots: opts.seq_qd,
            bs: SEQ_BS,
            extent: region,
        };
        let (w, covered) =
            run_phase(&mut q, arena, seq, opts.ms).map_err(|e| format!("{df} seqwrite1m: {e}"))?;
        let read = Spec {
            write: false,
            extent: covered,
            ..seq
        };
        let (r, _) =
            run_phase(&mut q, arena, read, opts.ms).map_err(|e| format!("{df} seqread1m: {e}"))?;
        let random = Spec {
            random: true,
            slots: opts.qd,
            bs: RAND_BS,
            ..read
        };
        let (rr, _) = run_phase(&mut q, arena, random, opts.ms)
            .map_err(|e| format!("{df} randread4k: {e}"))?;
        for (name, qd, f) in [
            ("seqwrite1m", opts.seq_qd, &w),
            ("seqread1m", opts.seq_qd, &r),
            ("randread4k", opts.qd, &rr),
        ] {
            println!(
                "bench-blk: {name} qd={qd} ops={} mib={} ms={} kicks={}",
                f.ops,
                f.bytes >> 20,
                f.ticks / khz,
                f.kicks
            );
        }
        println!(
            "bench-blk: {df} capacity={capacity} region_mib={} covered_mib={} verified=ok",
            region >> 20,
            covered >> 20
        );
        Ok(format!(
            "randread4k_qd{}_iops={} seqread1m_mbps={} seqwrite1m_mbps={}",
            opts.qd,
            rr.per_second(rr.ops, khz),
            r.per_second(r.bytes, khz) / 1_000_000,
            w.per_second(w.bytes, khz) / 1_000_000
        ))
    })();
    let status = dev.status();
    let reset = dev.reset();
    let figures = result?;
    if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) || status.contains(DeviceStatus::FAILED) {
        return Err(format!("{df} status {status:?} after the benchmark"));
    }
    reset?;
    Ok(figures)
}
