//! The virtio-blk device: features and configuration space, and the worker thread that serves
//! every queue (one thread per device, woken by any of its queues' eventfds and, with io_uring,
//! by each queue's completion eventfd).

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Once};

use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::backend::DiskBackend;
use super::counters::BlockCounters;
use super::feature;
use super::raw::{DiskError, RawFile};
use super::request::SECTOR_SIZE;
use super::server::{QueueState, Server};
use super::uring::UringQueue;
use crate::virtio::device::{ActivateError, ActivatedQueue, VirtioDevice};
use crate::virtio::interrupt::DeviceInterrupt;
use crate::virtio::worker::{Next, QueueWorker};
use crate::virtio::{GuestMemoryHandle, MAX_QUEUE_SIZE, features};

/// GET_ID's answer: at most 20 bytes, NUL-padded.
pub const SERIAL_LEN: usize = 20;
/// The most queues a disk may have.
pub const MAX_QUEUES: u16 = 64;
/// Data descriptors per request (SEG_MAX): a queue's worth minus header and status.
pub const SEG_MAX: u32 = MAX_QUEUE_SIZE as u32 - 2;
/// Largest data descriptor (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest request data; larger requests get IOERR.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// DISCARD / WRITE_ZEROES limits advertised in the configuration space.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 32;
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
pub(super) const DISCARD_SEGMENT_LEN: u64 = 16;
pub(super) const WRITE_ZEROES_UNMAP: u32 = 1;
/// `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` (and padding).
const CONFIG_LEN: usize = 60;

/// Worker tokens at and above this are queue `token - COMPLETIONS`'s io_uring completions; below
/// it, queue `token`'s notifications.
const COMPLETIONS: usize = MAX_QUEUES as usize;

/// How a device does IN, OUT and FLUSH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEngine {
    /// An io_uring per queue, many requests in flight, when the image is raw and the kernel
    /// allows io_uring; otherwise synchronous (one warning when the kernel refuses).
    Uring,
    /// `pread`/`pwrite`/`fdatasync` on the device thread, one request at a time.
    Sync,
}

/// The serial GET_ID returns: `id` when given, else the image's file name (its last 20 bytes).
pub fn serial_for(path: &Path, id: Option<&str>) -> [u8; SERIAL_LEN] {
    let name = id.map(str::as_bytes).unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default()
    });
    let name = &name[name.len().saturating_sub(SERIAL_LEN)..];
    let mut out = [0u8; SERIAL_LEN];
    out[..name.len()].copy_from_slice(name);
    out
}

/// A virtio block device.
pub struct Block {
    backend: Arc<dyn DiskBackend>,
    readonly: bool,
    serial: [u8; SERIAL_LEN],
    queue_sizes: Vec<u16>,
    config: [u8; CONFIG_LEN],
    engine: IoEngine,
    running: Option<IoEngine>,
    worker: Option<QueueWorker>,
    counters: Arc<BlockCounters>,
}

impl Block {
    /// `num_queues` is clamped to 1..=[`MAX_QUEUES`] (the configuration checks it first).
    pub fn new(
        backend: Arc<dyn DiskBackend>,
        readonly: bool,
        num_queues: u16,
        serial: [u8; SERIAL_LEN],
    ) -> Self {
        let num_queues = num_queues.clamp(1, MAX_QUEUES);
        let mut config = [0u8; CONFIG_LEN];
        let mut put =
            |off: usize, bytes: &[u8]| config[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(backend.size() / SECTOR_SIZE).to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        put(56, &[1]);
        Self {
            backend,
            readonly,
            serial,
            queue_sizes: vec![MAX_QUEUE_SIZE; usize::from(num_queues)],
            config,
            engine: IoEngine::Uring,
            running: None,
            worker: None,
            counters: Arc::default(),
        }
    }

    /// What the device has done since it was built (across driver resets).
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// The engine to use from the next activation on (the default is [`IoEngine::Uring`]).
    pub fn with_io_engine(mut self, engine: IoEngine) -> Self {
        self.engine = engine;
        self
    }

    /// The engine the running device uses (None while it is not activated).
    pub fn io_engine(&self) -> Option<IoEngine> {
        self.running
    }

    /// A ring per queue, or None for synchronous I/O: asked for, a backend that needs its own
    /// code path (qcow2), or a kernel that refuses io_uring (said once per process).
    fn rings(&self, queues: &[ActivatedQueue], write_through: bool) -> Option<Vec<UringQueue>> {
        if self.engine != IoEngine::Uring || self.backend.direct_fd().is_none() {
            return None;
        }
        let rings = queues
            .iter()
            .map(|q| UringQueue::new(self.backend.clone(), q.queue.size(), write_through))
            .collect::<std::io::Result<Vec<_>>>();
        match rings {
            Ok(rings) => Some(rings),
            Err(e) => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("virtio-blk: io_uring unavailable ({e}); using synchronous I/O");
                });
                None
            }
        }
    }

    /// A device on the raw image at `path` (opened and locked here).
    pub fn open_raw(
        path: &Path,
        readonly: bool,
        num_queues: u16,
        id: Option<&str>,
    ) -> Result<Self, DiskError> {
        let file = RawFile::open(path, readonly)?;
        Ok(Self::new(
            Arc::new(file),
            readonly,
            num_queues,
            serial_for(path, id),
        ))
    }
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("sectors", &(self.backend.size() / SECTOR_SIZE))
            .field("readonly", &self.readonly)
            .field("queues", &self.queue_sizes.len())
            .field("running", &self.running)
            .finish()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = features::BASE
            | feature::SIZE_MAX
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::MQ;
        f |= if self.readonly {
            feature::RO
        } else {
            feature::DISCARD | feature::WRITE_ZEROES
        };
        f
    }

    fn config_size(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.config.get(start..).and_then(|c| c.get(..data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        features: u64,
        queues: Vec<ActivatedQueue>,
        interrupt: DeviceInterrupt,
    ) -> Result<(), ActivateError> {
        let expected = self.queue_sizes.len();
        if queues.is_empty()
            || queues.len() > expected
            || queues.iter().any(|q| q.index >= expected)
        {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        self.reset();
        // Without FLUSH the driver expects a write-through cache.
        let write_through = features & feature::FLUSH == 0;
        let mut rings = self.rings(&queues, write_through).map(Vec::into_iter);
        let engine = if rings.is_some() {
            IoEngine::Uring
        } else {
            IoEngine::Sync
        };
        let mut states = Vec::with_capacity(queues.len());
        let mut events = Vec::with_capacity(2 * queues.len());
        for q in queues {
            let ring = rings.as_mut().and_then(Iterator::next);
            if let Some(ring) = &ring {
                let completions = ring.completion_event().map_err(ActivateError::Thread)?;
                events.push((COMPLETIONS + q.index, completions));
            }
            events.push((q.index, q.event));
            states.push(QueueState::new(q.index, q.queue, ring));
        }
        let mut server = Server::new(
            self.backend.clone(),
            self.readonly,
            write_through,
            self.serial,
            self.counters.clone(),
        );
        tracing::debug!("virtio-blk: {} queues active, {engine:?} I/O", states.len());
        let worker = QueueWorker::spawn("virtio-blk".into(), events, move |token| {
            let (index, completions) = match token.checked_sub(COMPLETIONS) {
                Some(index) => (index, true),
                None => (token, false),
            };
            let Some(q) = states.iter_mut().find(|q| q.index == index) else {
                return Next::Continue;
            };
            // The requests in flight hold this snapshot of guest memory until they complete.
            let mem = mem.memory().into_inner();
            let served = if completions {
                server.on_completions(q, &mem, &interrupt)
            } else {
                server.on_notify(q, &mem, &interrupt)
            };
            match served {
                Ok(()) => Next::Continue,
                Err(e) => {
                    interrupt.set_needs_reset(&e);
                    Next::Stop
                }
            }
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        self.running = Some(engine);
        Ok(())
    }

    /// Stops the thread, which first waits for every request in flight (their buffers are
    /// guest memory the kernel may still be writing).
    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.running = None;
    }
}
