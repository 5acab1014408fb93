//! The virtio-blk device: features and configuration space, and the worker thread that serves
//! every queue (one thread per device, woken by any of its queues' eventfds).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryMmap};

use super::backend::DiskBackend;
use super::raw::{DiskError, RawFile};
use super::request::{ParseError, RawDesc, Request, RequestType, SECTOR_SIZE, total_len};
use super::{feature, status};
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
const DISCARD_SEGMENT_LEN: u64 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Bounce buffer between the image and guest memory.
const BOUNCE_LEN: usize = 128 << 10;
/// `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` (and padding).
const CONFIG_LEN: usize = 60;

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
    worker: Option<QueueWorker>,
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
            worker: None,
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
            .field("running", &self.worker.is_some())
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
        let mut rings = Vec::with_capacity(queues.len());
        let mut events = Vec::with_capacity(queues.len());
        for q in queues {
            rings.push((q.index, q.queue));
            events.push((q.index, q.event));
        }
        let mut server = Server {
            backend: self.backend.clone(),
            readonly: self.readonly,
            // Without FLUSH the driver expects a write-through cache.
            write_through: features & feature::FLUSH == 0,
            serial: self.serial,
            bounce: vec![0; BOUNCE_LEN],
            descs: Vec::new(),
        };
        let worker = QueueWorker::spawn("virtio-blk".into(), events, move |index| {
            let Some((_, queue)) = rings.iter_mut().find(|(i, _)| *i == index) else {
                return Next::Continue;
            };
            let guard = mem.memory();
            match server.serve(index, queue, &guard, &interrupt) {
                Ok(()) => Next::Continue,
                Err(e) => {
                    interrupt.set_needs_reset(&e);
                    Next::Stop
                }
            }
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
enum QueueError {
    Ring(virtio_queue::Error),
    AvailIndex { avail: u16, next: u16 },
    BadChain { head: u16 },
    Request { head: u16, why: String },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ring(e) => write!(f, "ring access: {e}"),
            Self::AvailIndex { avail, next } => {
                write!(f, "avail index {avail} is too far from {next}")
            }
            Self::BadChain { head } => write!(
                f,
                "descriptor chain at {head} is empty, loops or is truncated"
            ),
            Self::Request { head, why } => write!(f, "request at {head}: {why}"),
        }
    }
}

impl From<virtio_queue::Error> for QueueError {
    fn from(e: virtio_queue::Error) -> Self {
        Self::Ring(e)
    }
}

/// The worker thread's state.
struct Server {
    backend: Arc<dyn DiskBackend>,
    readonly: bool,
    write_through: bool,
    serial: [u8; SERIAL_LEN],
    bounce: Vec<u8>,
    descs: Vec<RawDesc>,
}

/// A request's outcome: its status and how many bytes of the writable data were written.
type Outcome = (u8, u32);

const IOERR: Outcome = (status::IOERR, 0);
const UNSUPP: Outcome = (status::UNSUPP, 0);

impl Server {
    /// Serves every available chain of queue `index`, then re-enables notifications (looping if
    /// more arrived) and interrupts the driver if it asked to be.
    fn serve(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &DeviceInterrupt,
    ) -> Result<(), QueueError> {
        let mut used_any = false;
        loop {
            queue.disable_notification(mem)?;
            let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
            let next = queue.next_avail();
            if avail.wrapping_sub(next) > queue.size() {
                return Err(QueueError::AvailIndex { avail, next });
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                self.descs.clear();
                let mut ends = false;
                for desc in chain {
                    ends = !desc.has_next();
                    self.descs.push(RawDesc {
                        addr: desc.addr().raw_value(),
                        len: desc.len(),
                        write: desc.is_write_only(),
                    });
                }
                // The iterator stops silently on a loop, a bad index or a bad indirect table; a
                // well-formed chain always ends on a descriptor without NEXT.
                if self.descs.is_empty() || !ends {
                    return Err(QueueError::BadChain { head });
                }
                let (status_addr, (status, written)) = match Request::parse(mem, &self.descs) {
                    Ok(req) => (req.status, self.execute(mem, &req)),
                    Err(ParseError::Invalid { status, why }) => {
                        tracing::debug!("virtio-blk: request at {head}: {why}");
                        (status, IOERR)
                    }
                    Err(ParseError::Broken(why)) => {
                        return Err(QueueError::Request { head, why });
                    }
                };
                mem.write_obj(status, status_addr)
                    .map_err(|e| QueueError::Request {
                        head,
                        why: format!("status byte: {e}"),
                    })?;
                queue.add_used(mem, head, written.saturating_add(1))?;
                used_any = true;
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        if used_any && queue.needs_notification(mem)? {
            if let Err(e) = interrupt.signal_queue(index) {
                tracing::warn!("virtio-blk: interrupt: {e}");
            }
        }
        Ok(())
    }

    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Outcome {
        // Data in the wrong direction for the request type (besides header and status).
        let wrong_direction = match req.kind {
            RequestType::In | RequestType::GetId => total_len(&req.readable) != 0,
            RequestType::Other(_) => false,
            _ => total_len(&req.writable) != 0,
        };
        if wrong_direction {
            return IOERR;
        }
        match req.kind {
            RequestType::In => self.read(mem, req),
            RequestType::Out if self.readonly => IOERR,
            RequestType::Out => self.write(mem, req),
            RequestType::Flush => match self.backend.flush() {
                Ok(()) => (status::OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush: {e}");
                    IOERR
                }
            },
            RequestType::GetId => {
                let mut done = 0usize;
                for s in &req.writable {
                    let n = (SERIAL_LEN - done).min(s.len as usize);
                    if mem
                        .write_slice(&self.serial[done..done + n], s.addr)
                        .is_err()
                    {
                        return IOERR;
                    }
                    done += n;
                }
                (status::OK, done as u32)
            }
            RequestType::Discard | RequestType::WriteZeroes if self.readonly => UNSUPP,
            RequestType::Discard | RequestType::WriteZeroes => self.discard(mem, req),
            RequestType::Other(_) => UNSUPP,
        }
    }

    /// The byte offset of a data transfer of `len` bytes at `sector`, if it is a whole number of
    /// sectors inside the disk and not larger than we advertise.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            return None;
        }
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(len)? <= self.backend.size()).then_some(offset)
    }

    fn read(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Outcome {
        let len = total_len(&req.writable);
        let Some(mut offset) = self.range(req.sector, len) else {
            return IOERR;
        };
        for seg in &req.writable {
            let mut done = 0u64;
            while done < seg.len {
                let n = (seg.len - done).min(BOUNCE_LEN as u64) as usize;
                let buf = &mut self.bounce[..n];
                if let Err(e) = self.backend.read_at(buf, offset) {
                    tracing::warn!("virtio-blk: read at {offset:#x}: {e}");
                    return IOERR;
                }
                if mem.write_slice(buf, seg.addr.unchecked_add(done)).is_err() {
                    return IOERR;
                }
                done += n as u64;
                offset += n as u64;
            }
        }
        (status::OK, len as u32)
    }

    fn write(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Outcome {
        let len = total_len(&req.readable);
        let Some(mut offset) = self.range(req.sector, len) else {
            return IOERR;
        };
        for seg in &req.readable {
            let mut done = 0u64;
            while done < seg.len {
                let n = (seg.len - done).min(BOUNCE_LEN as u64) as usize;
                let buf = &mut self.bounce[..n];
                if mem.read_slice(buf, seg.addr.unchecked_add(done)).is_err() {
                    return IOERR;
                }
                if let Err(e) = self.backend.write_at(buf, offset) {
                    tracing::warn!("virtio-blk: write at {offset:#x}: {e}");
                    return IOERR;
                }
                done += n as u64;
                offset += n as u64;
            }
        }
        if self.write_through {
            if let Err(e) = self.backend.flush() {
                tracing::warn!("virtio-blk: flush: {e}");
                return IOERR;
            }
        }
        (status::OK, 0)
    }

    /// DISCARD and WRITE_ZEROES: an array of `{sector: u64, num_sectors: u32, flags: u32}`.
    fn discard(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Outcome {
        let len = total_len(&req.readable);
        if len == 0
            || len % DISCARD_SEGMENT_LEN != 0
            || len / DISCARD_SEGMENT_LEN > u64::from(MAX_DISCARD_SEG)
        {
            return IOERR;
        }
        let mut bytes = [0u8; (MAX_DISCARD_SEG as usize) * DISCARD_SEGMENT_LEN as usize];
        let bytes = &mut bytes[..len as usize];
        if !super::request::gather(mem, &req.readable, bytes) {
            return IOERR;
        }
        // Check every segment before acting on any.
        let mut ranges = Vec::with_capacity(bytes.len() / DISCARD_SEGMENT_LEN as usize);
        for seg in bytes.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let allowed = match req.kind {
                RequestType::WriteZeroes => WRITE_ZEROES_UNMAP,
                _ => 0,
            };
            if flags & !allowed != 0 {
                return UNSUPP;
            }
            if count > MAX_DISCARD_SECTORS {
                return IOERR;
            }
            let len = u64::from(count) * SECTOR_SIZE;
            let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                return IOERR;
            };
            if offset
                .checked_add(len)
                .is_none_or(|end| end > self.backend.size())
            {
                return IOERR;
            }
            ranges.push((offset, len, flags & WRITE_ZEROES_UNMAP != 0));
        }
        for (offset, len, unmap) in ranges {
            if len == 0 {
                continue;
            }
            let result = match req.kind {
                RequestType::WriteZeroes => self.backend.write_zeroes(offset, len, unmap),
                _ => self.backend.discard(offset, len),
            };
            if let Err(e) = result {
                tracing::warn!("virtio-blk: {:?} at {offset:#x}+{len:#x}: {e}", req.kind);
                return IOERR;
            }
        }
        (status::OK, 0)
    }
}
