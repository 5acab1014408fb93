//! End-to-end tests of the virtio-pci transport and virtio-rng, driven by a test-only driver that
//! does what a guest driver does: registers through the BAR, split rings in guest memory.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::pci_transport::{
    BAR_SIZE, DEVICE_OFFSET, ISR_OFFSET, NOTIFY_OFF_MULTIPLIER, NOTIFY_OFFSET, PciIds, cfg_type,
    notify_offset,
};
use super::{NO_VECTOR, Rng, RngCounters, VirtioInterrupt, VirtioPciTransport, features, status};

const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFS: u64 = 0x10000;
const QSIZE: u16 = 16;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Recorder {
    vectors: Mutex<Vec<u16>>,
    cv: Condvar,
}

impl VirtioInterrupt for Recorder {
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        self.vectors.lock().unwrap().push(vector);
        self.cv.notify_all();
        Ok(())
    }
}

impl Recorder {
    fn wait_for(&self, vector: u16) -> bool {
        let guard = self.vectors.lock().unwrap();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, TIMEOUT, |v| !v.contains(&vector))
            .unwrap();
        guard.contains(&vector)
    }

    fn count(&self) -> usize {
        self.vectors.lock().unwrap().len()
    }
}

/// A guest driver in miniature.
struct Driver {
    t: VirtioPciTransport,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    irq: Arc<Recorder>,
    avail_idx: u16,
    counters: Arc<RngCounters>,
}

// Common config offsets, as a driver knows them from the spec.
const DFSEL: u64 = 0x00;
const DF: u64 = 0x04;
const GFSEL: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_MSIX: u64 = 0x1a;
const Q_ENABLE: u64 = 0x1c;
const Q_NOTIFY_OFF: u64 = 0x1e;
const Q_DESC: u64 = 0x20;
const Q_DRIVER: u64 = 0x28;
const Q_DEVICE: u64 = 0x30;

impl Driver {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(mem);
        let irq = Arc::new(Recorder::default());
        let rng = Rng::new();
        let counters = rng.counters();
        let t = VirtioPciTransport::new(Box::new(rng), mem.clone(), irq.clone(), 0, 2).unwrap();
        Self {
            t,
            mem,
            irq,
            avail_idx: 0,
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
    fn status(&mut self) -> u8 {
        self.r(STATUS, 1) as u8
    }
    fn set_status(&mut self, s: u8) {
        self.w(STATUS, 1, u64::from(s));
    }

    /// ACKNOWLEDGE → DRIVER → features → FEATURES_OK; true if the device kept FEATURES_OK.
    fn negotiate(&mut self, wanted: u64) -> bool {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.offered();
        assert_ne!(offered & features::VERSION_1, 0);
        self.w(GFSEL, 4, 0);
        self.w(GF, 4, wanted & 0xffff_ffff);
        self.w(GFSEL, 4, 1);
        self.w(GF, 4, wanted >> 32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status() & status::FEATURES_OK != 0
    }

    fn offered(&mut self) -> u64 {
        self.w(DFSEL, 4, 0);
        let lo = self.r(DF, 4);
        self.w(DFSEL, 4, 1);
        lo | (self.r(DF, 4) << 32)
    }

    /// Programs queue 0 and enables it; returns queue_enable as read back.
    fn setup_queue(&mut self, size: u16, vector: u16) -> bool {
        self.w(Q_SELECT, 2, 0);
        assert_eq!(self.r(Q_SIZE, 2), 256, "max size");
        self.w(Q_SIZE, 2, u64::from(size));
        self.w(Q_MSIX, 2, u64::from(vector));
        // Split 64-bit writes, as Linux does.
        self.w(Q_DESC, 4, DESC);
        self.w(Q_DESC + 4, 4, 0);
        self.w(Q_DRIVER, 8, AVAIL);
        self.w(Q_DEVICE, 4, USED);
        self.w(Q_DEVICE + 4, 4, 0);
        self.w(Q_ENABLE, 2, 1);
        self.r(Q_ENABLE, 2) == 1
    }

    fn start(&mut self, feats: u64) {
        assert!(self.negotiate(feats));
        self.w(MSIX_CONFIG, 2, 0);
        assert!(self.setup_queue(QSIZE, 1));
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(self.status() & status::DRIVER_OK, status::DRIVER_OK);
    }

    fn mem(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> {
        self.mem.memory()
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem()
            .write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
            .unwrap();
    }

    /// Makes the chain starting at `head` available (does not notify).
    fn post(&mut self, head: u16) {
        let slot = self.avail_idx % QSIZE;
        let m = self.mem();
        m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        drop(m);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem()
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn notify(&mut self) {
        self.w(notify_offset(0), 2, 0);
    }

    fn used_idx(&self) -> u16 {
        self.mem().read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used_elem(&self, i: u16) -> (u32, u32) {
        let base = USED + 4 + 8 * u64::from(i % QSIZE);
        let m = self.mem();
        (
            m.read_obj(GuestAddress(base)).unwrap(),
            m.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    fn wait_used(&self, idx: u16) -> bool {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if self.used_idx() == idx {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    fn wait_needs_reset(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if self.status() & status::DEVICE_NEEDS_RESET != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    fn buf(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem().read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn non_constant(b: &[u8]) -> bool {
    b.iter().any(|&x| x != b[0])
}

#[test]
fn ids_and_capabilities() {
    let mut d = Driver::new();
    assert_eq!(
        d.t.pci_ids(),
        PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision_id: 1,
            class_code: 0xff_00_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    );
    let caps = d.t.capabilities();
    let types: Vec<u8> = caps.iter().map(|c| c.cfg_type).collect();
    assert_eq!(types, [cfg_type::COMMON, cfg_type::ISR, cfg_type::NOTIFY]);
    let notify = caps[2].bytes();
    assert_eq!(
        notify,
        [
            0x09, 0, 20, 2, 0, 0, 0, 0, // vndr, next, len, type, bar, id, pad
            0x00, 0x30, 0, 0, // offset
            4, 0, 0, 0, // length: one queue
            4, 0, 0, 0, // multiplier
        ]
    );
    assert_eq!(caps[0].bytes().len(), 16);
    for c in &caps {
        assert!(u64::from(c.offset) + u64::from(c.length) <= BAR_SIZE);
    }
    assert_eq!(d.t.notify_events().len(), 1);
    assert_eq!(d.t.notify_events()[0].0, NOTIFY_OFFSET);
    assert_eq!(d.r(NUM_QUEUES, 2), 1);
    assert_eq!(d.r(Q_NOTIFY_OFF, 2), 0);
    assert_eq!(NOTIFY_OFF_MULTIPLIER, 4);
    let offered = d.offered();
    assert_eq!(
        offered,
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    );
}

#[test]
fn rng_fills_buffers_and_interrupts_queue_vector() {
    let mut d = Driver::new();
    d.start(features::VERSION_1);
    assert_eq!(d.r(Q_MSIX, 2), 1);
    // Two single-descriptor chains and one two-descriptor chain (read-only + writable).
    d.write_desc(0, BUFS, 64, VRING_DESC_F_WRITE, 0);
    d.write_desc(1, BUFS + 0x1000, 128, VRING_DESC_F_WRITE, 0);
    d.write_desc(2, BUFS + 0x2000, 32, VRING_DESC_F_NEXT, 3);
    d.write_desc(3, BUFS + 0x3000, 16, VRING_DESC_F_WRITE, 0);
    d.post(0);
    d.post(1);
    d.post(2);
    d.notify();
    assert!(d.wait_used(3), "used idx {}", d.used_idx());
    assert_eq!(d.used_elem(0), (0, 64));
    assert_eq!(d.used_elem(1), (1, 128));
    assert_eq!(d.used_elem(2), (2, 16));
    let a = d.buf(BUFS, 64);
    let b = d.buf(BUFS + 0x1000, 128);
    assert!(non_constant(&a) && non_constant(&b));
    assert_ne!(a[..], b[..64]);
    assert!(non_constant(&d.buf(BUFS + 0x3000, 16)));
    // The device-readable buffer was not written.
    assert_eq!(d.buf(BUFS + 0x2000, 32), vec![0; 32]);
    // Beyond the 64-byte buffer: untouched.
    assert_eq!(d.buf(BUFS + 64, 64), vec![0; 64]);
    // Served: the writable bytes only, per chain.
    assert_eq!(
        (d.counters.read_ops.get(), d.counters.read_bytes.get()),
        (3, 64 + 128 + 16)
    );
    assert!(d.irq.wait_for(1), "queue vector 1 never fired");
    assert!(!d.irq.vectors.lock().unwrap().contains(&0), "no config irq");
    // INTx view: ISR bit 0, read-to-clear.
    assert_eq!(d.r(ISR_OFFSET, 1), 1);
    assert_eq!(d.r(ISR_OFFSET, 1), 0);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut d = Driver::new();
    d.start(features::VERSION_1 | features::RING_EVENT_IDX);
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    d.mem().write_obj(0u16, used_event).unwrap();
    d.write_desc(0, BUFS, 16, VRING_DESC_F_WRITE, 0);
    d.post(0);
    d.notify();
    assert!(d.wait_used(1));
    assert!(d.irq.wait_for(1));
    let fired = d.irq.count();
    // The driver asks for an interrupt only after the 10th used buffer.
    d.mem().write_obj(10u16, used_event).unwrap();
    d.post(0);
    d.notify();
    assert!(d.wait_used(2));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.irq.count(), fired, "interrupt despite used_event");
    // The device published avail_event = next_avail for the driver's notifications.
    let avail_event: u16 = d
        .mem()
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 2);
}

#[test]
fn reset_clears_state_and_device_restarts() {
    let mut d = Driver::new();
    d.start(features::VERSION_1);
    d.write_desc(0, BUFS, 16, VRING_DESC_F_WRITE, 0);
    d.post(0);
    d.notify();
    assert!(d.wait_used(1));

    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.r(Q_ENABLE, 2), 0);
    assert_eq!(d.r(Q_SIZE, 2), 256);
    assert_eq!(d.r(Q_DESC, 8), 0);
    assert_eq!(d.r(Q_MSIX, 2), u64::from(NO_VECTOR));
    assert_eq!(d.r(MSIX_CONFIG, 2), u64::from(NO_VECTOR));
    d.w(GFSEL, 4, 0);
    assert_eq!(d.r(GF, 4), 0);
    assert_eq!(d.r(ISR_OFFSET, 1), 0);

    // The device thread is gone: a notification does nothing.
    d.post(0);
    d.notify();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(), 1);

    // A fresh driver start works from a clean ring.
    d.mem()
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .unwrap();
    d.avail_idx = 0;
    d.start(features::VERSION_1);
    d.write_desc(0, BUFS + 0x100, 16, VRING_DESC_F_WRITE, 0);
    d.post(0);
    d.notify();
    assert!(d.wait_used(1));
    assert!(non_constant(&d.buf(BUFS + 0x100, 16)));
}

#[test]
fn features_ok_refused_for_unoffered_or_legacy() {
    let mut d = Driver::new();
    // Bit 0 is not offered by rng.
    assert!(!d.negotiate(features::VERSION_1 | 1));
    // A legacy driver (no VERSION_1) is refused.
    assert!(!d.negotiate(features::RING_EVENT_IDX));
    // FEATURES_OK without ACKNOWLEDGE|DRIVER first.
    d.set_status(0);
    d.w(GFSEL, 4, 1);
    d.w(GF, 4, 1);
    d.set_status(status::FEATURES_OK);
    assert_eq!(d.status() & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not activate.
    d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert_eq!(d.status() & status::DRIVER_OK, 0);
    // And a correct negotiation still succeeds afterwards.
    assert!(d.negotiate(features::VERSION_1 | features::RING_EVENT_IDX));
    // Features are frozen after FEATURES_OK.
    d.w(GFSEL, 4, 0);
    d.w(GF, 4, 1);
    assert_eq!(d.r(GF, 4), features::RING_EVENT_IDX);
}

#[test]
fn queue_size_must_be_a_power_of_two_within_max() {
    for bad in [100u16, 0, 512, 3] {
        let mut d = Driver::new();
        assert!(d.negotiate(features::VERSION_1));
        assert!(!d.setup_queue(bad, 1), "size {bad} enabled");
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        // Reset recovers.
        d.set_status(0);
        assert_eq!(d.status(), 0);
        assert!(d.negotiate(features::VERSION_1));
        assert!(d.setup_queue(QSIZE, 1));
    }
}

#[test]
fn queue_vector_beyond_msix_table_reads_no_vector() {
    let mut d = Driver::new();
    assert!(d.negotiate(features::VERSION_1));
    d.w(Q_MSIX, 2, 2); // the table has vectors 0 and 1
    assert_eq!(d.r(Q_MSIX, 2), u64::from(NO_VECTOR));
    d.w(MSIX_CONFIG, 2, 1);
    assert_eq!(d.r(MSIX_CONFIG, 2), 1);
}

#[test]
fn rings_outside_memory_refused_on_enable() {
    let mut d = Driver::new();
    assert!(d.negotiate(features::VERSION_1));
    d.w(Q_SELECT, 2, 0);
    d.w(Q_SIZE, 2, u64::from(QSIZE));
    d.w(Q_DESC, 8, MEM_SIZE as u64 - 16);
    d.w(Q_DRIVER, 8, AVAIL);
    d.w(Q_DEVICE, 8, USED);
    d.w(Q_ENABLE, 2, 1);
    assert_eq!(d.r(Q_ENABLE, 2), 0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn descriptor_outside_memory_sets_needs_reset() {
    let mut d = Driver::new();
    d.start(features::VERSION_1);
    d.write_desc(0, MEM_SIZE as u64 - 8, 64, VRING_DESC_F_WRITE, 0);
    d.post(0);
    d.notify();
    assert!(d.wait_needs_reset());
    assert!(d.irq.wait_for(0), "config interrupt for NEEDS_RESET");
    assert_eq!(d.r(ISR_OFFSET, 1) & 2, 2);
    assert_eq!(d.used_idx(), 0);
    // Also an address that wraps around u64.
    let mut d = Driver::new();
    d.start(features::VERSION_1);
    d.write_desc(0, u64::MAX - 4, 64, VRING_DESC_F_WRITE, 0);
    d.post(0);
    d.notify();
    assert!(d.wait_needs_reset());
}

#[test]
fn descriptor_loop_sets_needs_reset_without_hanging() {
    let mut d = Driver::new();
    d.start(features::VERSION_1);
    d.write_desc(0, BUFS, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
    d.write_desc(1, BUFS + 16, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0);
    d.post(0);
    d.notify();
    assert!(d.wait_needs_reset());
    // The chain was never completed, so nothing counts as served.
    assert_eq!(
        (d.counters.read_ops.get(), d.counters.read_bytes.get()),
        (0, 0)
    );
    // The transport still answers and a reset brings the device back.
    d.set_status(0);
    assert_eq!(d.status(), 0);
}

#[test]
fn bad_head_index_and_avail_jump_set_needs_reset() {
    let mut d = Driver::new();
    d.start(features::VERSION_1);
    d.post(QSIZE + 3); // head beyond the table
    d.notify();
    assert!(d.wait_needs_reset());

    let mut d = Driver::new();
    d.start(features::VERSION_1);
    d.mem()
        .write_obj(QSIZE * 4, GuestAddress(AVAIL + 2))
        .unwrap();
    d.notify();
    assert!(d.wait_needs_reset());
}

/// xorshift64*: deterministic, no dependency.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_register_traffic_never_panics() {
    let mut rng = Rand(0x9e37_79b9_7f4a_7c15);
    let mut d = Driver::new();
    let hot: Vec<u64> = (0..0x38)
        .chain([ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET, NOTIFY_OFFSET + 4])
        .chain([BAR_SIZE - 1, BAR_SIZE, u64::MAX - 3])
        .collect();
    let mut running = 0u32;
    for i in 0..200_000u32 {
        let r = rng.next();
        let off = if r % 4 == 0 {
            rng.next() % (BAR_SIZE + 16)
        } else {
            hot[(rng.next() % hot.len() as u64) as usize]
        };
        let len = [0usize, 1, 2, 3, 4, 5, 8, 9][(rng.next() % 8) as usize];
        let mut buf = [0u8; 9];
        let v = rng.next().to_le_bytes();
        buf[..8].copy_from_slice(&v);
        match rng.next() % 8 {
            0..=2 => d.t.read(off, &mut buf[..len]),
            3 => {
                // Steer toward activation with rings somewhere in (or out of) memory.
                let s = [1u8, 3, 11, 15, 0][(rng.next() % 5) as usize];
                d.w(STATUS, 1, u64::from(s));
                let st = d.status();
                if st & status::DRIVER_OK != 0 && st & status::DEVICE_NEEDS_RESET == 0 {
                    running += 1;
                }
            }
            4 if r % 3 == 0 => {
                // A plausible queue set-up, so that DRIVER_OK sometimes starts the device.
                d.w(GFSEL, 4, 0);
                d.w(GF, 4, 0);
                d.w(GFSEL, 4, 1);
                d.w(GF, 4, 1);
                d.w(Q_SELECT, 2, 0);
                d.w(Q_SIZE, 2, u64::from(QSIZE));
                d.w(Q_DESC, 8, DESC);
                d.w(Q_DRIVER, 8, AVAIL);
                d.w(Q_DEVICE, 8, USED);
                d.w(Q_ENABLE, 2, 1);
                d.w(notify_offset(0), 2, 0);
            }
            4 => {
                // Scribble over the rings and descriptors the device may be reading.
                let at = DESC + rng.next() % 0x3000;
                let _ = d.mem().write_slice(&v, GuestAddress(at));
            }
            _ => d.t.write(off, &buf[..len]),
        }
        if i % 10_000 == 0 {
            d.w(STATUS, 1, 0);
        }
    }
    assert!(running > 0, "the device never ran");
    // Still a working device after all that.
    d.mem()
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .unwrap();
    d.avail_idx = 0;
    d.start(features::VERSION_1);
    d.write_desc(0, BUFS, 32, VRING_DESC_F_WRITE, 0);
    d.post(0);
    d.notify();
    assert!(d.wait_used(1));
}
