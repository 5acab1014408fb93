//! The `bench-net` check: frame rates of the first modern virtio-net function, driven from
//! ring 3 through [`RawQueue`]s (see `vring.rs` for why), polled, no interrupts, no offloads.
//!
//! Frames are raw Ethernet (ethertype 0x88b5, local experimental) carrying `HPBENCH!` and a
//! big-endian u32 sequence number; 60-byte frames measure packets per second, 1514-byte frames
//! bits per second (counted over the Ethernet frame, without the 12-byte virtio header).
//!
//! - TX, `bench.ms` per size (default 2000): the whole TX queue is kept full; a frame counts
//!   when the device hands its buffer back. TX frames go to 02:00:00:00:00:01, so the host
//!   drops them right after the TAP; they only need to be consumed.
//! - RX, `bench.net.rx_small` 60-byte frames (default 262144), then `bench.net.rx_large`
//!   1514-byte frames (default 65536); 0 skips that size. The host must queue the frames in the
//!   TAP before the guest takes them, so that the guest measures the VMM rather than the
//!   sender: the guest prints `bench-net: rx-ready frame=<bytes> frames=<n> mac=<mac>` and
//!   waits (at most 60 s) for a byte on COM1; the host then writes frames with sequence numbers
//!   0..n to the TAP, addressed to that MAC, and sends the byte. The guest posts its receive
//!   buffers (the whole queue; they stay posted), counts frames until it has n or none has come
//!   for 500 ms, and checks that the sequence numbers arrive in order. Frames already in the
//!   used ring when a phase starts count but are not timed; the rate is measured from the
//!   first frame to the last.
//!
//! `PROBE bench-net ok tx_pps=<n> tx_gbps=<x.xx> rx_pps=<n> rx_gbps=<x.xx>`.

use crate::arena;
use crate::cmdline;
use crate::pvh::StartInfo;
use crate::vring::{self, DESC_F_WRITE, RawQueue};
use crate::{println, serial, time, user, virtio};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::transport::pci::VIRTIO_VENDOR_ID;
use virtio_drivers::transport::{DeviceStatus, Transport};

/// Modern virtio-net PCI device id (0x1040 + 1).
const NET_MODERN: u16 = 0x1041;
const F_MAC: u64 = 1 << 5;
const RX: u16 = 0;
const TX: u16 = 1;
const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1` (with `num_buffers`).
const VNET_HDR: u64 = 12;
const BUF: u64 = 2048;
pub const SMALL: u64 = 60;
pub const LARGE: u64 = 1514;
pub const ETHERTYPE: u16 = 0x88b5;
pub const TAG: &[u8; 8] = b"HPBENCH!";
/// Ethernet header, tag, sequence number.
const MIN_FRAME: u64 = 14 + 8 + 4;
const TX_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Arena layout.
const TX_QUEUE_AT: u64 = 32 << 10;
const RX_BUFS_AT: u64 = 1 << 20;
const TX_BUFS_AT: u64 = RX_BUFS_AT + BUF * QUEUE_SIZE as u64;
const ARENA_BYTES: u64 = 2 << 20;
const DRAIN_TIMEOUT_US: u64 = 10_000_000;
const GO_TIMEOUT_US: u64 = 60_000_000;
const FIRST_FRAME_TIMEOUT_US: u64 = 10_000_000;
const IDLE_US: u64 = 500_000;

/// Ring-3 return codes.
const DONE: u64 = 0;
const STUCK: u64 = 1;
const BAD_ID: u64 = 2;
const NO_FRAMES: u64 = 3;

/// One timed phase, shared with the ring-3 loop by pointer.
#[repr(C)]
struct Traffic {
    q: *mut RawQueue,
    bufs: u64,
    slots: u64,
    /// TX: frame length. RX: frames the host sends.
    frame: u64,
    expect: u64,
    mac: [u8; 6],
    /// RX: buffers are already posted (a previous RX phase).
    posted: bool,
    run_ticks: u64,
    drain_ticks: u64,
    wait_ticks: u64,
    idle_ticks: u64,
    // Results.
    frames: u64,
    /// Frames and bytes after the first timed one (what the rate is computed from).
    timed_frames: u64,
    timed_bytes: u64,
    elapsed: u64,
    early: u64,
    other: u64,
    out_of_order: u64,
    bad_id: u32,
}

impl Traffic {
    fn buf(&self, slot: u64) -> u64 {
        self.bufs + slot * BUF
    }

    /// The timed TX loop (ring 3).
    fn transmit(&mut self) -> u64 {
        // SAFETY: ring 0 hands over the queue for the duration of the phase.
        let q = unsafe { &mut *self.q };
        for s in 0..self.slots {
            let b = self.buf(s);
            let mut f = [0u8; (VNET_HDR + MIN_FRAME) as usize];
            let e = VNET_HDR as usize;
            f[e..e + 6].copy_from_slice(&TX_DST);
            f[e + 6..e + 12].copy_from_slice(&self.mac);
            f[e + 12..e + 14].copy_from_slice(&ETHERTYPE.to_be_bytes());
            f[e + 14..e + 22].copy_from_slice(TAG);
            f[e + 22..e + 26].copy_from_slice(&(s as u32).to_be_bytes());
            // SAFETY: slot s's buffer (BUF bytes of arena RAM) holds header and frame.
            unsafe {
                core::ptr::write_bytes(b as *mut u8, 0, (VNET_HDR + self.frame) as usize);
                core::ptr::copy_nonoverlapping(f.as_ptr(), b as *mut u8, f.len());
            }
            q.set_desc(s as u16, b, (VNET_HDR + self.frame) as u32, 0, None);
        }
        let start = time::rdtsc();
        let stop = start + self.run_ticks;
        let give_up = stop + self.drain_ticks;
        for s in 0..self.slots {
            q.push(s as u16);
        }
        q.publish();
        let mut last = start;
        loop {
            while let Some((id, _)) = q.pop_used() {
                if u64::from(id) >= self.slots {
                    self.bad_id = id;
                    return BAD_ID;
                }
                last = time::rdtsc();
                self.frames += 1;
                if last < stop {
                    q.push(id as u16);
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
        self.timed_frames = self.frames;
        self.timed_bytes = self.frames * self.frame;
        DONE
    }

    /// Checks one received buffer; true if it is one of ours (and counts it).
    fn take(&mut self, slot: u64, len: u32, timed: bool) -> bool {
        let len = u64::from(len);
        if !(VNET_HDR + MIN_FRAME..=BUF).contains(&len) {
            self.other += 1;
            return false;
        }
        // SAFETY: the device wrote `len` (<= BUF) bytes of slot's buffer and returned it.
        let f = unsafe {
            core::slice::from_raw_parts(
                (self.buf(slot) + VNET_HDR) as *const u8,
                (len - VNET_HDR) as usize,
            )
        };
        if f.get(12..14) != Some(&ETHERTYPE.to_be_bytes()[..]) || f.get(14..22) != Some(&TAG[..]) {
            self.other += 1;
            return false;
        }
        let seq = f
            .get(22..26)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(u32::MAX);
        if u64::from(seq) != self.frames {
            self.out_of_order += 1;
        }
        self.frames += 1;
        if !timed {
            self.early += 1;
        } else if self.frames > self.early + 1 {
            self.timed_frames += 1;
            self.timed_bytes += len - VNET_HDR;
        }
        true
    }

    /// The RX loop (ring 3).
    fn receive(&mut self) -> u64 {
        // SAFETY: ring 0 hands over the queue for the duration of the phase.
        let q = unsafe { &mut *self.q };
        if !self.posted {
            for s in 0..self.slots {
                q.set_desc(s as u16, self.buf(s), BUF as u32, DESC_F_WRITE, None);
                q.push(s as u16);
            }
        }
        // Frames the device took while the host was still queueing them.
        while let Some((id, len)) = q.pop_used() {
            if u64::from(id) >= self.slots {
                self.bad_id = id;
                return BAD_ID;
            }
            self.take(u64::from(id), len, false);
            q.push(id as u16);
        }
        q.publish();
        let start = time::rdtsc();
        let (mut first, mut last) = (0u64, 0u64);
        loop {
            while let Some((id, len)) = q.pop_used() {
                if u64::from(id) >= self.slots {
                    self.bad_id = id;
                    return BAD_ID;
                }
                let now = time::rdtsc();
                if self.take(u64::from(id), len, true) {
                    if self.frames == self.early + 1 {
                        first = now;
                    }
                    last = now;
                }
                q.push(id as u16);
            }
            q.publish();
            if self.frames >= self.expect {
                break;
            }
            let now = time::rdtsc();
            if self.frames == self.early {
                if now > start + self.wait_ticks {
                    break;
                }
            } else if now > last + self.idle_ticks {
                break;
            }
        }
        if self.frames == 0 {
            return NO_FRAMES;
        }
        self.elapsed = last - first;
        DONE
    }
}

extern "C" fn transmit_in_ring3(arg: u64) -> u64 {
    // SAFETY: `run` passes a pointer to its live `Traffic` and waits for us to return.
    let t = unsafe { &mut *(arg as *mut Traffic) };
    t.transmit()
}

extern "C" fn receive_in_ring3(arg: u64) -> u64 {
    // SAFETY: as above.
    let t = unsafe { &mut *(arg as *mut Traffic) };
    t.receive()
}

fn mac_str(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Rates of one phase.
struct Rate {
    pps: u64,
    mbps: u64,
}

impl Rate {
    fn of(t: &Traffic, khz: u64) -> Self {
        let per_s =
            |n: u64| (u128::from(n) * u128::from(khz) * 1000 / u128::from(t.elapsed.max(1))) as u64;
        Self {
            pps: per_s(t.timed_frames),
            mbps: per_s(t.timed_bytes * 8) / 1_000_000,
        }
    }

    fn gbps(&self) -> String {
        format!("{}.{:02}", self.mbps / 1000, (self.mbps % 1000) / 10)
    }
}

fn new_traffic(q: &mut RawQueue, bufs: u64, mac: [u8; 6]) -> Traffic {
    Traffic {
        q: &raw mut *q,
        bufs,
        slots: u64::from(q.size),
        frame: 0,
        expect: 0,
        mac,
        posted: false,
        run_ticks: 0,
        drain_ticks: time::ticks_for_us(DRAIN_TIMEOUT_US),
        wait_ticks: time::ticks_for_us(FIRST_FRAME_TIMEOUT_US),
        idle_ticks: time::ticks_for_us(IDLE_US),
        frames: 0,
        timed_frames: 0,
        timed_bytes: 0,
        elapsed: 0,
        early: 0,
        other: 0,
        out_of_order: 0,
        bad_id: 0,
    }
}

fn tx_phase(
    q: &mut RawQueue,
    arena: u64,
    mac: [u8; 6],
    frame: u64,
    ms: u64,
) -> Result<Traffic, String> {
    let mut t = new_traffic(q, arena + TX_BUFS_AT, mac);
    t.frame = frame;
    t.run_ticks = time::ticks_for_us(ms * 1000);
    match user::run(transmit_in_ring3, &raw mut t as u64) {
        DONE => Ok(t),
        STUCK => Err(format!(
            "{} frames still queued {} s after the phase ended ({} sent)",
            q.in_flight(),
            DRAIN_TIMEOUT_US / 1_000_000,
            t.frames
        )),
        BAD_ID => Err(format!("device returned used id {}", t.bad_id)),
        other => Err(format!("ring-3 loop ended with {other:#x}")),
    }
}

/// Tells the host we are ready for `frames` frames of `frame` bytes, and waits for its byte.
fn wait_for_host(frame: u64, frames: u64, mac: &[u8; 6]) -> Result<(), String> {
    while serial::try_read_byte().is_some() {}
    println!(
        "bench-net: rx-ready frame={frame} frames={frames} mac={}",
        mac_str(mac)
    );
    let deadline = time::rdtsc() + time::ticks_for_us(GO_TIMEOUT_US);
    while serial::try_read_byte().is_none() {
        if time::rdtsc() > deadline {
            return Err(format!(
                "no go byte on COM1 within {} s after rx-ready (the host side must queue \
                 the frames, then write a byte to the serial console)",
                GO_TIMEOUT_US / 1_000_000
            ));
        }
        time::delay_us(1000);
    }
    Ok(())
}

fn rx_phase(
    q: &mut RawQueue,
    arena: u64,
    mac: [u8; 6],
    frame: u64,
    frames: u64,
    posted: bool,
) -> Result<Traffic, String> {
    wait_for_host(frame, frames, &mac)?;
    let mut t = new_traffic(q, arena + RX_BUFS_AT, mac);
    t.expect = frames;
    t.posted = posted;
    match user::run(receive_in_ring3, &raw mut t as u64) {
        DONE => {}
        NO_FRAMES => {
            return Err(format!(
                "no frame within {} s of the go byte ({} others)",
                FIRST_FRAME_TIMEOUT_US / 1_000_000,
                t.other
            ));
        }
        BAD_ID => return Err(format!("device returned used id {}", t.bad_id)),
        other => return Err(format!("ring-3 loop ended with {other:#x}")),
    }
    if t.frames < frames || t.out_of_order > 0 {
        return Err(format!(
            "{} of {frames} frames arrived, {} out of order (are the TAP's txqueuelen and \
             the host's memory large enough?)",
            t.frames, t.out_of_order
        ));
    }
    if t.timed_frames == 0 {
        return Err(format!(
            "all {} frames were taken before the go byte: nothing to time",
            t.frames
        ));
    }
    Ok(t)
}

/// Options from the command line.
struct Options {
    ms: u64,
    rx_small: u64,
    rx_large: u64,
}

/// The `bench-net` check.
pub fn check(si: &StartInfo, si_paddr: u64, cmdline: &str) -> Result<String, String> {
    let opts = Options {
        ms: cmdline::number_in(cmdline, "bench.ms", 2000, 10..=600_000)?,
        rx_small: cmdline::number_in(cmdline, "bench.net.rx_small", 262_144, 0..=1 << 30)?,
        rx_large: cmdline::number_in(cmdline, "bench.net.rx_large", 65_536, 0..=1 << 30)?,
    };
    let khz = time::tsc_khz().ok_or("TSC frequency unknown: cannot time the benchmark")?;
    let mut found = virtio::find_id(si.rsdp_paddr, NET_MODERN)?;
    if found.functions.is_empty() {
        return Err(format!(
            "no virtio 1.x network device ({VIRTIO_VENDOR_ID:04x}:{NET_MODERN:04x}) on bus 0"
        ));
    }
    let arena = arena::take(si, si_paddr, ARENA_BYTES)?;
    let mut dev = vring::bring_up(&mut found, 0, F_MAC)?;
    let df = dev.df;
    let result = (|| {
        if dev.features & F_MAC == 0 {
            return Err(format!("{df} offers no MAC address"));
        }
        let lo: u32 = dev
            .transport
            .read_config_space(0)
            .map_err(|e| format!("{df} mac: {e}"))?;
        let hi: u16 = dev
            .transport
            .read_config_space(4)
            .map_err(|e| format!("{df} mac: {e}"))?;
        let mut mac = [0u8; 6];
        mac[..4].copy_from_slice(&lo.to_le_bytes());
        mac[4..].copy_from_slice(&hi.to_le_bytes());
        let mut rxq = dev.add_queue(RX, QUEUE_SIZE, arena)?;
        let mut txq = dev.add_queue(TX, QUEUE_SIZE, arena + TX_QUEUE_AT)?;
        dev.start();
        let mut figures = Vec::new();
        for (name, frame) in [("tx_pps", SMALL), ("tx_gbps", LARGE)] {
            let t = tx_phase(&mut txq, arena, mac, frame, opts.ms)
                .map_err(|e| format!("{df} tx {frame}-byte frames: {e}"))?;
            let rate = Rate::of(&t, khz);
            println!(
                "bench-net: tx frame={frame} frames={} ms={} pps={} mbps={} kicks={}",
                t.frames,
                t.elapsed / khz,
                rate.pps,
                rate.mbps,
                txq.kicks
            );
            figures.push(if name == "tx_pps" {
                format!("{name}={}", rate.pps)
            } else {
                format!("{name}={}", rate.gbps())
            });
        }
        let mut posted = false;
        for (name, frame, frames) in [
            ("rx_pps", SMALL, opts.rx_small),
            ("rx_gbps", LARGE, opts.rx_large),
        ] {
            if frames == 0 {
                continue;
            }
            let t = rx_phase(&mut rxq, arena, mac, frame, frames, posted)
                .map_err(|e| format!("{df} rx {frame}-byte frames: {e}"))?;
            posted = true;
            let rate = Rate::of(&t, khz);
            println!(
                "bench-net: rx frame={frame} frames={} early={} others={} ms={} pps={} mbps={} kicks={}",
                t.frames,
                t.early,
                t.other,
                t.elapsed / khz,
                rate.pps,
                rate.mbps,
                rxq.kicks
            );
            figures.push(if name == "rx_pps" {
                format!("{name}={}", rate.pps)
            } else {
                format!("{name}={}", rate.gbps())
            });
        }
        println!("bench-net: {df} mac={}", mac_str(&mac));
        Ok(figures.join(" "))
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
