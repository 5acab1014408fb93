//! The device thread's work on a queue: taking chains off the avail ring, checking them, doing
//! them, and putting them in the used ring.
//!
//! IN, OUT and FLUSH go to the queue's io_uring when it has one ([`UringQueue`]) and finish
//! later, when the ring's completion eventfd wakes the thread; otherwise (qcow2, io_uring
//! unavailable, or the sync engine asked for) they run synchronously through a bounce buffer.
//! GET_ID, DISCARD and WRITE_ZEROES are always synchronous (`fallocate` is quick, or the
//! backend's own work for qcow2).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::DiskBackend;
use super::counters::BlockCounters;
use super::device::{
    DISCARD_SEGMENT_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_REQUEST_BYTES, SERIAL_LEN,
    WRITE_ZEROES_UNMAP,
};
use super::request::{ParseError, RawDesc, Request, RequestType, SECTOR_SIZE, Segment, total_len};
use super::status;
use super::uring::{Io, Outcome, UringQueue};
use crate::virtio::interrupt::DeviceInterrupt;

/// Bounce buffer between the image and guest memory (synchronous I/O).
const BOUNCE_LEN: usize = 128 << 10;

const IOERR: Outcome = (status::IOERR, 0);
const UNSUPP: Outcome = (status::UNSUPP, 0);

/// Why a queue is unusable until the driver resets the device.
#[derive(Debug)]
pub enum QueueError {
    Ring(virtio_queue::Error),
    AvailIndex { avail: u16, next: u16 },
    BadChain { head: u16 },
    Request { head: u16, why: String },
    Uring(io::Error),
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
            Self::Uring(e) => write!(f, "io_uring: {e}"),
        }
    }
}

impl From<virtio_queue::Error> for QueueError {
    fn from(e: virtio_queue::Error) -> Self {
        Self::Ring(e)
    }
}

/// One queue as the device thread sees it.
pub struct QueueState {
    pub index: usize,
    pub queue: Queue,
    /// The queue's io_uring, or None for synchronous I/O.
    pub ring: Option<UringQueue>,
    /// Chains wait in the avail ring (notifications off) because the ring is full; the next
    /// completion takes them.
    throttled: bool,
}

impl QueueState {
    pub fn new(index: usize, queue: Queue, ring: Option<UringQueue>) -> Self {
        Self {
            index,
            queue,
            ring,
            throttled: false,
        }
    }
}

/// The device thread's state, shared by its queues.
pub struct Server {
    backend: Arc<dyn DiskBackend>,
    readonly: bool,
    write_through: bool,
    serial: [u8; SERIAL_LEN],
    bounce: Vec<u8>,
    descs: Vec<RawDesc>,
    counters: Arc<BlockCounters>,
}

impl Server {
    /// `write_through`: the driver did not negotiate FLUSH, so every write is made durable
    /// before it completes.
    pub fn new(
        backend: Arc<dyn DiskBackend>,
        readonly: bool,
        write_through: bool,
        serial: [u8; SERIAL_LEN],
        counters: Arc<BlockCounters>,
    ) -> Self {
        Self {
            backend,
            readonly,
            write_through,
            serial,
            bounce: vec![0; BOUNCE_LEN],
            descs: Vec::new(),
            counters,
        }
    }

    /// The driver notified queue `q`: takes every available chain (or as many as the ring has
    /// room for), then interrupts the driver if it asked to be.
    pub fn on_notify(
        &mut self,
        q: &mut QueueState,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &DeviceInterrupt,
    ) -> Result<(), QueueError> {
        let mut used = false;
        self.take_requests(q, mem, &mut used)?;
        self.finish(q, mem, interrupt, used)
    }

    /// Queue `q`'s ring has completions: puts finished requests in the used ring, and takes
    /// chains that waited for room.
    pub fn on_completions(
        &mut self,
        q: &mut QueueState,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &DeviceInterrupt,
    ) -> Result<(), QueueError> {
        let used = reap(q, mem, &self.counters)?;
        self.finish(q, mem, interrupt, used)
    }

    /// Submits what the ring has queued, and interrupts the driver if something was used and it
    /// asked to be (EVENT_IDX or the NO_INTERRUPT flag).
    fn finish(
        &mut self,
        q: &mut QueueState,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &DeviceInterrupt,
        mut used: bool,
    ) -> Result<(), QueueError> {
        while let Some(ring) = &mut q.ring {
            ring.submit().map_err(QueueError::Uring)?;
            // Page-cache hits complete during the submit: hand them back in this step rather
            // than after another wake-up of the thread (hence the eventfd is cleared first; a
            // completion after that raises it again).
            ring.clear_completion_event();
            used |= reap(q, mem, &self.counters)?;
            // Room again for chains that waited: take them now, as their wake-up was cleared.
            if q.throttled && q.ring.as_ref().is_some_and(|r| !r.is_full()) {
                self.take_requests(q, mem, &mut used)?;
                continue;
            }
            submit(q)?;
            break;
        }
        if used && q.queue.needs_notification(mem.as_ref())? {
            if let Err(e) = interrupt.signal_queue(q.index) {
                tracing::warn!("virtio-blk: interrupt: {e}");
            }
        }
        Ok(())
    }

    /// Takes chains until the avail ring is empty (notifications back on) or the ring is full
    /// (notifications left off until completions make room).
    fn take_requests(
        &mut self,
        q: &mut QueueState,
        mem: &Arc<GuestMemoryMmap>,
        used: &mut bool,
    ) -> Result<(), QueueError> {
        let QueueState {
            queue,
            ring,
            throttled,
            ..
        } = q;
        let m: &GuestMemoryMmap = mem;
        loop {
            queue.disable_notification(m)?;
            let avail = queue.avail_idx(m, Ordering::Acquire)?.0;
            let next = queue.next_avail();
            if avail.wrapping_sub(next) > queue.size() {
                return Err(QueueError::AvailIndex { avail, next });
            }
            loop {
                if ring.as_ref().is_some_and(UringQueue::is_full) {
                    *throttled = true;
                    return Ok(());
                }
                let Some(chain) = queue.pop_descriptor_chain(m) else {
                    break;
                };
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
                // Counted before the used ring shows the request done, so a driver that reads
                // the counters after a completion sees it.
                let finished = match Request::parse(m, &self.descs) {
                    Ok(req) => self
                        .start(ring.as_mut(), mem, head, &req)
                        .map_err(QueueError::Uring)?
                        .map(|outcome| {
                            self.counters.completed(req.kind, req.data_len(), outcome.0);
                            (req.status, outcome)
                        }),
                    Err(ParseError::Invalid { status, why }) => {
                        tracing::debug!("virtio-blk: request at {head}: {why}");
                        self.counters.errors.inc();
                        Some((status, IOERR))
                    }
                    Err(ParseError::Broken(why)) => {
                        return Err(QueueError::Request { head, why });
                    }
                };
                if let Some((status, outcome)) = finished {
                    put_used(queue, m, head, status, outcome)?;
                    *used = true;
                }
            }
            *throttled = false;
            if !queue.enable_notification(m)? {
                break;
            }
        }
        Ok(())
    }

    /// Starts a checked request: `Some` if it finished at once, None if it is in the ring.
    fn start(
        &mut self,
        ring: Option<&mut UringQueue>,
        mem: &Arc<GuestMemoryMmap>,
        head: u16,
        req: &Request,
    ) -> io::Result<Option<Outcome>> {
        // Data in the wrong direction for the request type (besides header and status).
        let wrong_direction = match req.kind {
            RequestType::In | RequestType::GetId => total_len(&req.readable) != 0,
            RequestType::Other(_) => false,
            _ => total_len(&req.writable) != 0,
        };
        if wrong_direction {
            return Ok(Some(IOERR));
        }
        let io = match req.kind {
            RequestType::In => match self.range(req.sector, total_len(&req.writable)) {
                Some(offset) => Io::Read {
                    offset,
                    segs: &req.writable,
                },
                None => return Ok(Some(IOERR)),
            },
            RequestType::Out if self.readonly => return Ok(Some(IOERR)),
            RequestType::Out => match self.range(req.sector, total_len(&req.readable)) {
                Some(offset) => Io::Write {
                    offset,
                    segs: &req.readable,
                },
                None => return Ok(Some(IOERR)),
            },
            RequestType::Flush => Io::Flush,
            RequestType::GetId => return Ok(Some(self.get_id(mem, req))),
            RequestType::Discard | RequestType::WriteZeroes if self.readonly => {
                return Ok(Some(UNSUPP));
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                return Ok(Some(self.discard(mem, req)));
            }
            RequestType::Other(_) => return Ok(Some(UNSUPP)),
        };
        match ring {
            Some(ring) => ring.start(mem, head, req.status, io),
            None => Ok(Some(self.sync_io(mem, io))),
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

    fn sync_io(&mut self, mem: &GuestMemoryMmap, io: Io<'_>) -> Outcome {
        match io {
            Io::Read { offset, segs } => self.read(mem, offset, segs),
            Io::Write { offset, segs } => self.write(mem, offset, segs),
            Io::Flush => match self.backend.flush() {
                Ok(()) => (status::OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush: {e}");
                    IOERR
                }
            },
        }
    }

    fn read(&mut self, mem: &GuestMemoryMmap, mut offset: u64, segs: &[Segment]) -> Outcome {
        for seg in segs {
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
        (status::OK, total_len(segs) as u32)
    }

    fn write(&mut self, mem: &GuestMemoryMmap, mut offset: u64, segs: &[Segment]) -> Outcome {
        for seg in segs {
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

    fn get_id(&self, mem: &GuestMemoryMmap, req: &Request) -> Outcome {
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

/// Counts and puts the requests that queue `q`'s ring has finished in the used ring; true if
/// any.
fn reap(
    q: &mut QueueState,
    mem: &GuestMemoryMmap,
    counters: &BlockCounters,
) -> Result<bool, QueueError> {
    let QueueState { queue, ring, .. } = q;
    let Some(ring) = ring else {
        return Ok(false);
    };
    let mut used = false;
    let mut failed = None;
    ring.reap(|c| {
        if failed.is_none() {
            counters.completed(c.kind, c.bytes, c.outcome.0);
            match put_used(queue, mem, c.head, c.status, c.outcome) {
                Ok(()) => used = true,
                Err(e) => failed = Some(e),
            }
        }
    })
    .map_err(QueueError::Uring)?;
    failed.map_or(Ok(used), Err)
}

fn submit(q: &mut QueueState) -> Result<(), QueueError> {
    match &mut q.ring {
        Some(ring) => ring.submit().map_err(QueueError::Uring),
        None => Ok(()),
    }
}

/// Writes a finished request's status byte and puts its chain in the used ring (the used
/// length counts the status byte).
fn put_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    status: GuestAddress,
    (status_byte, written): Outcome,
) -> Result<(), QueueError> {
    mem.write_obj(status_byte, status)
        .map_err(|e| QueueError::Request {
            head,
            why: format!("status byte: {e}"),
        })?;
    queue.add_used(mem, head, written.saturating_add(1))?;
    Ok(())
}
