//! virtio-rng (entropy device, id 4): one queue; every device-writable buffer the driver posts is
//! filled with bytes from the host's `getrandom`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap, Permissions,
};

use super::counters::counter_set;
use super::device::{ActivateError, ActivatedQueue, VirtioDevice};
use super::interrupt::DeviceInterrupt;
use super::worker::{QueueWorker, Served, after_serving};
use super::{GuestMemoryHandle, features};

const QUEUE_SIZES: [u16; 1] = [256];

/// At most this many bytes are produced per descriptor chain (the driver learns the real count
/// from the used length), so one hostile request cannot keep the thread busy for long.
const MAX_BYTES_PER_CHAIN: u32 = 1 << 20;

counter_set! {
    /// Entropy served: bytes given to the driver, and the requests (chains) they filled.
    pub struct RngCounters {
        read_bytes,
        read_ops,
    }
}

/// The virtio entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<QueueWorker>,
    counters: Arc<RngCounters>,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the device has served since it was built (across driver resets).
    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::BASE
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        _features: u64,
        queues: Vec<ActivatedQueue>,
        interrupt: DeviceInterrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Some(ActivatedQueue {
            index,
            mut queue,
            event,
        }) = queues.into_iter().find(|q| q.index == 0)
        else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.reset();
        let rekick = event.try_clone().map_err(ActivateError::Thread)?;
        let counters = self.counters.clone();
        let worker = QueueWorker::spawn("virtio-rng".into(), vec![(index, event)], move |_| {
            let guard = mem.memory();
            let served = serve(&mut queue, &guard, &interrupt, &counters);
            after_serving(served, &rekick, &interrupt)
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

/// Why a queue is unusable until the driver resets the device.
#[derive(Debug)]
pub(crate) enum QueueError {
    Ring(virtio_queue::Error),
    /// The avail index moved more than a queue's worth past what we consumed.
    AvailIndex {
        avail: u16,
        next: u16,
    },
    /// A chain that is empty, loops, or runs off its table.
    BadChain {
        head: u16,
    },
    /// A buffer outside guest memory.
    BadBuffer {
        addr: u64,
        len: u32,
    },
    Entropy(getrandom::Error),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ring(e) => write!(f, "ring access: {e}"),
            Self::AvailIndex { avail, next } => {
                write!(f, "avail index {avail} is too far from {next}")
            }
            Self::BadChain { head } => {
                write!(
                    f,
                    "descriptor chain at {head} is empty, loops or is truncated"
                )
            }
            Self::BadBuffer { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} is outside guest memory")
            }
            Self::Entropy(e) => write!(f, "getrandom: {e}"),
        }
    }
}

impl From<virtio_queue::Error> for QueueError {
    fn from(e: virtio_queue::Error) -> Self {
        Self::Ring(e)
    }
}

/// Serves available chains (at most a queue's worth), re-enables notifications when the queue is
/// empty (looping if more arrived), and interrupts the driver if it asked to be.
fn serve(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &DeviceInterrupt,
    counters: &RngCounters,
) -> Result<Served, QueueError> {
    let mut used_any = false;
    let mut budget = usize::from(queue.size());
    let served = loop {
        queue.disable_notification(mem)?;
        let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
        let next = queue.next_avail();
        if avail.wrapping_sub(next) > queue.size() {
            return Err(QueueError::AvailIndex { avail, next });
        }
        while budget > 0 {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let mut written = 0u32;
            let mut count = 0usize;
            let mut ends = false;
            for desc in chain {
                count += 1;
                ends = !desc.has_next();
                if desc.is_write_only() {
                    let len = desc.len().min(MAX_BYTES_PER_CHAIN - written);
                    fill_random(mem, desc.addr(), len)?;
                    written += len;
                }
            }
            // The iterator stops silently on a loop, a bad index, an unreadable descriptor or a
            // bad indirect table; a well-formed chain always ends on a descriptor without NEXT.
            if count == 0 || !ends {
                return Err(QueueError::BadChain { head });
            }
            counters.read_ops.inc();
            counters.read_bytes.add(u64::from(written));
            queue.add_used(mem, head, written)?;
            used_any = true;
        }
        if budget == 0 {
            break Served::Batch;
        }
        if !queue.enable_notification(mem)? {
            break Served::All;
        }
    };
    if used_any && queue.needs_notification(mem)? {
        if let Err(e) = interrupt.signal_queue(0) {
            tracing::warn!("virtio-rng: interrupt: {e}");
        }
    }
    Ok(served)
}

fn fill_random(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> Result<(), QueueError> {
    let bad = || QueueError::BadBuffer { addr: addr.0, len };
    if !GuestMemory::check_range(mem, addr, len as usize, Permissions::Write) {
        return Err(bad());
    }
    let mut chunk = [0u8; 4096];
    let mut done = 0u32;
    while done < len {
        let n = (len - done).min(chunk.len() as u32) as usize;
        getrandom::fill(&mut chunk[..n]).map_err(QueueError::Entropy)?;
        let at = addr.checked_add(u64::from(done)).ok_or_else(bad)?;
        mem.write_slice(&chunk[..n], at).map_err(|_| bad())?;
        done += n as u32;
    }
    Ok(())
}
