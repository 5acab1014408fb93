//! virtio-console driven directly (activation with rings in test memory), as a guest would use
//! it: transmit reaches the writer, held input reaches receive buffers, broken chains set
//! DEVICE_NEEDS_RESET.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{CONFIG_SIZE, Console, INPUT_CAPACITY, RECEIVEQ, TRANSMITQ};
use crate::virtio::interrupt::DeviceInterrupt;
use crate::virtio::{ActivatedQueue, VirtioDevice, VirtioInterrupt, features};

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const BUFS: u64 = 0x80000;
const TIMEOUT: Duration = Duration::from_secs(5);

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ring addresses of queue `q`.
fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

struct Driver {
    dev: Console,
    out: Shared,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    irq: DeviceInterrupt,
    events: Vec<EventFd>,
    avail: [u16; 2],
}

impl Driver {
    fn new() -> Self {
        let out = Shared::default();
        let dev = Console::new(Box::new(out.clone())).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut d = Self {
            dev,
            out,
            mem: GuestMemoryAtomic::new(mem),
            irq: DeviceInterrupt::new("console-test", 2, Arc::new(NoIrq)),
            events: Vec::new(),
            avail: [0; 2],
        };
        let mut queues = Vec::new();
        for index in 0..2 {
            let (desc, avail, used) = rings(index);
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
            q.set_ready(true);
            let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            d.events.push(event.try_clone().unwrap());
            queues.push(ActivatedQueue {
                index,
                queue: q,
                event,
            });
        }
        d.dev
            .activate(d.mem.clone(), features::VERSION_1, queues, d.irq.clone())
            .unwrap();
        d
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

    /// Makes the chain at `head` available on queue `q` and notifies.
    fn post(&mut self, q: usize, head: u16) {
        let (_, avail, _) = rings(q);
        let slot = self.avail[q] % QSIZE;
        self.mem()
            .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem()
            .write_obj(self.avail[q], GuestAddress(avail + 2))
            .unwrap();
        self.events[q].write(1).unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem().read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// The used element `i` of queue `q`: (head, length).
    fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let base = rings(q).2 + 4 + 8 * u64::from(i % QSIZE);
        let m = self.mem();
        (
            m.read_obj(GuestAddress(base)).unwrap(),
            m.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    fn wait(&self, mut done: impl FnMut(&Self) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if done(self) {
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

impl Drop for Driver {
    fn drop(&mut self) {
        self.dev.reset();
    }
}

#[test]
fn config_space_and_identity() {
    let out = Shared::default();
    let dev = Console::new(Box::new(out)).unwrap();
    assert_eq!(dev.device_type(), 3);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    assert_eq!(dev.config_size(), CONFIG_SIZE);
    let mut c = [0xffu8; CONFIG_SIZE];
    dev.read_config(0, &mut c);
    assert_eq!(c, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let mut b = [0xffu8; 2];
    dev.read_config(4, &mut b);
    assert_eq!(b, [1, 0]);
}

#[test]
fn transmit_reaches_the_writer() {
    let mut d = Driver::new();
    d.mem().write_slice(b"hello, ", GuestAddress(BUFS)).unwrap();
    d.mem()
        .write_slice(b"console\n", GuestAddress(BUFS + 0x100))
        .unwrap();
    d.write_desc(TRANSMITQ, 0, BUFS, 7, VRING_DESC_F_NEXT, 1);
    d.write_desc(TRANSMITQ, 1, BUFS + 0x100, 8, 0, 0);
    d.write_desc(TRANSMITQ, 2, BUFS + 0x100, 3, 0, 0);
    d.post(TRANSMITQ, 0);
    d.post(TRANSMITQ, 2);
    assert!(d.wait(|d| d.used_idx(TRANSMITQ) == 2));
    assert_eq!(&*d.out.0.lock().unwrap(), b"hello, console\ncon");
    assert_eq!(d.used_elem(TRANSMITQ, 0), (0, 0));
    assert!(!d.irq.needs_reset());
}

#[test]
fn receive_delivers_held_input_as_buffers_arrive() {
    let mut d = Driver::new();
    let input = d.dev.input();
    // Input before any buffer is held, not lost.
    assert_eq!(input.push(b"abcdef"), 6);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(RECEIVEQ), 0);
    // A 4-byte buffer takes the first 4 bytes; the next buffer the rest.
    d.write_desc(RECEIVEQ, 0, BUFS, 4, VRING_DESC_F_WRITE, 0);
    d.post(RECEIVEQ, 0);
    assert!(d.wait(|d| d.used_idx(RECEIVEQ) == 1));
    assert_eq!(d.used_elem(RECEIVEQ, 0), (0, 4));
    assert_eq!(d.buf(BUFS, 4), b"abcd");
    d.write_desc(RECEIVEQ, 1, BUFS + 0x100, 64, VRING_DESC_F_WRITE, 0);
    d.post(RECEIVEQ, 1);
    assert!(d.wait(|d| d.used_idx(RECEIVEQ) == 2));
    assert_eq!(d.used_elem(RECEIVEQ, 1), (1, 2));
    assert_eq!(d.buf(BUFS + 0x100, 2), b"ef");
    // A posted buffer waits for input, which then arrives through the input eventfd.
    d.write_desc(RECEIVEQ, 2, BUFS + 0x200, 64, VRING_DESC_F_WRITE, 0);
    d.post(RECEIVEQ, 2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(RECEIVEQ), 2, "no buffer used without input");
    assert_eq!(input.push(b"xyz"), 3);
    assert!(d.wait(|d| d.used_idx(RECEIVEQ) == 3));
    assert_eq!(d.used_elem(RECEIVEQ, 2), (2, 3));
    assert_eq!(d.buf(BUFS + 0x200, 3), b"xyz");
    assert!(!d.irq.needs_reset());
}

#[test]
fn input_is_bounded_until_the_guest_takes_it() {
    let mut d = Driver::new();
    let input = d.dev.input();
    let big = vec![b'q'; INPUT_CAPACITY + 100];
    assert_eq!(input.push(&big), INPUT_CAPACITY);
    assert_eq!(input.push(b"more"), 0, "full: nothing taken");
    d.write_desc(RECEIVEQ, 0, BUFS, 1000, VRING_DESC_F_WRITE, 0);
    d.post(RECEIVEQ, 0);
    assert!(d.wait(|d| d.used_idx(RECEIVEQ) == 1));
    assert_eq!(d.used_elem(RECEIVEQ, 0), (0, 1000));
    assert_eq!(input.push(b"more"), 4);
}

#[test]
fn malformed_chains_set_needs_reset() {
    // A transmit buffer outside guest memory.
    let mut d = Driver::new();
    d.write_desc(TRANSMITQ, 0, MEM_SIZE as u64 - 4, 64, 0, 0);
    d.post(TRANSMITQ, 0);
    assert!(d.wait(|d| d.irq.needs_reset()));
    assert!(d.out.0.lock().unwrap().is_empty());

    // A descriptor loop on the transmitq.
    let mut d = Driver::new();
    d.write_desc(TRANSMITQ, 0, BUFS, 1, VRING_DESC_F_NEXT, 1);
    d.write_desc(TRANSMITQ, 1, BUFS, 1, VRING_DESC_F_NEXT, 0);
    d.post(TRANSMITQ, 0);
    assert!(d.wait(|d| d.irq.needs_reset()));

    // A receive buffer outside guest memory, taken once there is input.
    let mut d = Driver::new();
    d.write_desc(RECEIVEQ, 0, u64::MAX - 8, 64, VRING_DESC_F_WRITE, 0);
    d.post(RECEIVEQ, 0);
    d.dev.input().push(b"x");
    assert!(d.wait(|d| d.irq.needs_reset()));

    // An avail index far beyond the queue size.
    let d = Driver::new();
    let (_, avail, _) = rings(RECEIVEQ);
    d.mem().write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    d.dev.input().push(b"x");
    assert!(d.wait(|d| d.irq.needs_reset()));
}
