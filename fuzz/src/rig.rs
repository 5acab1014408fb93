//! A driver for one virtio device behind the real virtio-pci transport ([`VirtioPciTransport`]):
//! it negotiates features, places the rings and sets DRIVER_OK as a guest driver would, kicks
//! queues through the notify region, and waits until the device's thread has nothing left to do.
//!
//! "Nothing left to do" is observed from outside, because the device models are used unchanged:
//! every kicked queue's eventfd has been drained by the device thread, and that thread is then
//! blocked in `epoll_wait` (read from `/proc/self/task/*/syscall`) — or the device reported
//! DEVICE_NEEDS_RESET. A device that stays busy for [`HANG`] is a hang, and the run panics.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperpool_devices::virtio::pci_transport::notify_offset;
use hyperpool_devices::virtio::{VirtioDevice, VirtioInterrupt, VirtioPciTransport, status};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// Registers of `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3) at the start of the BAR.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// How long a device may stay busy after a kick before the run counts as a hang.
pub const HANG: Duration = Duration::from_secs(20);

/// Ring slot `i` (0-based): descriptor table, avail ring and used ring. A slot holds a queue of
/// 256 entries; slot 0 starts at guest address 0, so a short input still reaches its rings.
pub fn rings(slot: usize) -> (u64, u64, u64) {
    let base = slot as u64 * 0x2000;
    (base, base + 0x1000, base + 0x1400)
}

/// Interrupts go nowhere: the driver here never sleeps on them.
struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Rig {
    transport: VirtioPciTransport,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    thread: &'static str,
    features: u64,
}

impl Rig {
    /// `device` in guest memory `mem`; `thread` is the name of the thread it serves its queues on.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, thread: &'static str) -> Self {
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let mem = GuestMemoryAtomic::new(mem);
        let transport = VirtioPciTransport::new(device, mem.clone(), Arc::new(NoIrq), 0, vectors)
            .expect("the device fits the virtio-pci transport");
        Self {
            transport,
            mem,
            thread,
            features: 0,
        }
    }

    fn write(&mut self, offset: u64, value: u64, len: usize) {
        self.transport.write(offset, &value.to_le_bytes()[..len]);
    }

    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.transport.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Negotiates `wanted` (what of it the device offers, plus VERSION_1), puts queue `order[i]`
    /// in ring slot `i` with `size` entries, and sets DRIVER_OK. False if the device refused to
    /// start (a bad queue size, say): it then has no thread to wait for.
    pub fn start(&mut self, wanted: u64, size: u16, order: &[usize]) -> bool {
        use common::*;
        self.write(DEVICE_STATUS, status::ACKNOWLEDGE.into(), 1);
        let driver = status::ACKNOWLEDGE | status::DRIVER;
        self.write(DEVICE_STATUS, driver.into(), 1);
        let mut offered = 0u64;
        for word in 0..2 {
            self.write(DEVICE_FEATURE_SELECT, word, 4);
            offered |= self.read(DEVICE_FEATURE, 4) << (32 * word);
        }
        let features = (offered & wanted) | hyperpool_devices::virtio::features::VERSION_1;
        for word in 0..2 {
            self.write(DRIVER_FEATURE_SELECT, word, 4);
            self.write(DRIVER_FEATURE, (features >> (32 * word)) & 0xffff_ffff, 4);
        }
        self.write(DEVICE_STATUS, (driver | status::FEATURES_OK).into(), 1);
        if self.read(DEVICE_STATUS, 1) as u8 & status::FEATURES_OK == 0 {
            return false;
        }
        self.features = features;
        for (slot, &queue) in order.iter().enumerate() {
            let (desc, avail, used) = rings(slot);
            self.write(QUEUE_SELECT, queue as u64, 2);
            self.write(QUEUE_SIZE, size.into(), 2);
            self.write(QUEUE_DESC, desc, 8);
            self.write(QUEUE_DRIVER, avail, 8);
            self.write(QUEUE_DEVICE, used, 8);
            self.write(QUEUE_ENABLE, 1, 2);
        }
        let ok = driver | status::FEATURES_OK | status::DRIVER_OK;
        self.write(DEVICE_STATUS, ok.into(), 1);
        self.transport.device_status() & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET)
            == status::DRIVER_OK
    }

    /// The features negotiated by [`Rig::start`].
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn memory(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> + '_ {
        self.mem.memory()
    }

    pub fn needs_reset(&self) -> bool {
        self.transport.device_status() & status::DEVICE_NEEDS_RESET != 0
    }

    /// Notifies queue `queue` as a driver does: a write to its address in the notify region.
    pub fn kick(&mut self, queue: usize) {
        self.transport
            .write(notify_offset(queue), &(queue as u16).to_le_bytes());
    }

    /// Waits until the device has served every kick and sleeps, or reported itself broken.
    pub fn wait_idle(&self) {
        let deadline = Instant::now() + HANG;
        let mut idle_seen = 0;
        loop {
            if self.needs_reset() {
                return;
            }
            // Twice in a row: a thread just woken (not yet scheduled) still shows its old
            // syscall, but it has then not drained its eventfd.
            if self.kicks_drained() && thread_sleeps(self.thread) {
                idle_seen += 1;
                if idle_seen == 2 {
                    return;
                }
            } else {
                idle_seen = 0;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still busy {HANG:?} after the last kick (a hang, or a guest-driven loop)",
                self.thread
            );
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn kicks_drained(&self) -> bool {
        self.transport.notify_events().iter().all(|(_, fd)| {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no timeout; the eventfd is owned by the transport.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            n == 0
        })
    }
}

/// Whether the thread called `name` is blocked in `epoll_wait`. Not finding it counts as busy: a
/// thread just spawned has not named itself yet, and a device thread that quit without reporting
/// DEVICE_NEEDS_RESET has stopped serving its queues silently (the wait then ends as a hang).
fn thread_sleeps(name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let syscall = std::fs::read_to_string(path.join("syscall")).unwrap_or_default();
        let nr = syscall.split_whitespace().next().unwrap_or("running");
        // x86_64: epoll_wait, epoll_pwait, epoll_pwait2.
        return matches!(nr, "232" | "281" | "441");
    }
    false
}
