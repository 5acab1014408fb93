//! Asynchronous I/O for one queue of a raw image, on an io_uring.
//!
//! Each IN, OUT and FLUSH request becomes one operation in the ring at a time: `readv`/`writev`
//! straight between the image file and the guest's buffers, or `fdatasync`. Completions raise an
//! eventfd registered with the ring, which the device thread's epoll waits on next to the queue's
//! notification eventfd; the thread then reaps them and hands back finished requests.
//!
//! - At most one request per slot is in flight, and there are as many slots as the queue has
//!   entries; the ring's submission queue is at least that large, so pushing never fails.
//! - A short read or write is resubmitted for the rest; a transfer that makes no progress (the
//!   image shrank under us) or fails gets IOERR. Nothing short is ever reported as done.
//! - A FLUSH waits until every write started before it has completed (each write has a sequence
//!   number), then `fdatasync`s. Later requests do not wait for the flush: the driver orders
//!   requests by waiting for their completion, never by queue position.
//! - Without a negotiated FLUSH (write-through), writes carry `RWF_DSYNC`.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::DiskBackend;
use super::iovec::{GuestIovecs, Iovecs};
use super::request::{RequestType, Segment};
use super::status;

/// A request's outcome: its status and how many bytes of its writable buffers were filled.
pub type Outcome = (u8, u32);

/// How often an operation that failed with EINTR or EAGAIN is retried before it gets IOERR.
const MAX_RETRIES: u8 = 3;

/// What a request asks of the disk.
#[derive(Clone, Copy, Debug)]
pub enum Io<'a> {
    Read { offset: u64, segs: &'a [Segment] },
    Write { offset: u64, segs: &'a [Segment] },
    Flush,
}

/// A request that has finished: `outcome` goes to the guest, the status byte at `status`.
#[derive(Debug, PartialEq, Eq)]
pub struct Completed {
    pub head: u16,
    pub status: GuestAddress,
    pub outcome: Outcome,
    /// IN, OUT or FLUSH.
    pub kind: RequestType,
    /// Data bytes transferred (all of the request's when it succeeded).
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    /// `seq` orders the write against flushes.
    Write {
        seq: u64,
    },
    Flush,
}

/// What to do after an operation's completion.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Submit the rest.
    Again,
    /// The request is finished with this status.
    Done(u8),
}

/// One request in flight.
#[derive(Debug)]
struct Op {
    head: u16,
    status: GuestAddress,
    kind: Kind,
    /// Image offset of the request's first byte.
    offset: u64,
    bufs: GuestIovecs,
    /// Bytes transferred so far.
    done: u64,
    retries: u8,
    /// The `iovec`s of the operation in the ring; left alone until its completion.
    current: Iovecs,
    /// Keeps the guest memory that `bufs` points into mapped until the op is dropped, which is
    /// only after its last completion (even if the VMM swaps in a new memory map meanwhile).
    _mem: Arc<GuestMemoryMmap>,
}

impl Op {
    /// Accounts for an operation's result (bytes, or a negative errno).
    fn progress(&mut self, res: i32) -> Progress {
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EINTR | libc::EAGAIN) && self.retries < MAX_RETRIES {
                self.retries += 1;
                return Progress::Again;
            }
            tracing::warn!(
                "virtio-blk: {:?} at {:#x}: {}",
                self.kind,
                self.offset + self.done,
                io::Error::from_raw_os_error(errno)
            );
            return Progress::Done(status::IOERR);
        }
        if self.kind == Kind::Flush {
            return Progress::Done(status::OK);
        }
        let n = u64::from(res.unsigned_abs());
        let left = self.bufs.len() - self.done;
        if n == 0 || n > left {
            tracing::warn!(
                "virtio-blk: {:?} at {:#x}: {n} of {left} bytes transferred (image truncated?)",
                self.kind,
                self.offset + self.done
            );
            return Progress::Done(status::IOERR);
        }
        self.done += n;
        self.retries = 0;
        if self.done == self.bufs.len() {
            Progress::Done(status::OK)
        } else {
            Progress::Again
        }
    }

    fn request_type(&self) -> RequestType {
        match self.kind {
            Kind::Read => RequestType::In,
            Kind::Write { .. } => RequestType::Out,
            Kind::Flush => RequestType::Flush,
        }
    }

    fn outcome(&self, status: u8) -> Outcome {
        match self.kind {
            Kind::Read if status == status::OK => (status, self.bufs.len() as u32),
            _ => (status, 0),
        }
    }
}

/// One queue's ring and its requests in flight.
pub struct UringQueue {
    ring: IoUring,
    event: EventFd,
    /// The image file; `_backend` keeps it open.
    fd: RawFd,
    _backend: Arc<dyn DiskBackend>,
    write_through: bool,
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Operations pushed to the ring whose completion has not been reaped.
    in_kernel: usize,
    next_write: u64,
    /// Sequence numbers of writes in flight.
    writes: BTreeSet<u64>,
    /// Flushes (slot, first later write) waiting for the writes before them.
    parked: VecDeque<(usize, u64)>,
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringQueue")
            .field("depth", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl UringQueue {
    /// A ring for up to `depth` requests on `backend`'s file. Fails if the backend cannot do
    /// direct file I/O or the kernel refuses io_uring (too old, disabled, seccomp).
    pub fn new(backend: Arc<dyn DiskBackend>, depth: u16, write_through: bool) -> io::Result<Self> {
        let fd = backend
            .direct_fd()
            .ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?
            .as_raw_fd();
        let depth = usize::from(depth.max(1));
        let ring = IoUring::new(depth.next_power_of_two() as u32)?;
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Self {
            ring,
            event,
            fd,
            _backend: backend,
            write_through,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            in_kernel: 0,
            next_write: 0,
            writes: BTreeSet::new(),
            parked: VecDeque::new(),
            cqes: Vec::with_capacity(depth),
        })
    }

    /// The eventfd the ring signals on every completion.
    pub fn completion_event(&self) -> io::Result<EventFd> {
        self.event.try_clone()
    }

    /// Resets the completion eventfd, before a [`UringQueue::reap`] outside its wake-up: the
    /// completions reaped then need no wake-up of their own, and any later one signals anew.
    pub fn clear_completion_event(&self) {
        let _ = self.event.read();
    }

    /// No room for another request until one completes.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts `io` for the chain at `head` (whose status byte is at `status`), on buffers in
    /// `mem`. `Ok(Some(_))` is a request finished at once (no data, or buffers outside guest
    /// memory); `Ok(None)` one in flight. Call [`UringQueue::submit`] after a batch.
    pub fn start(
        &mut self,
        mem: &Arc<GuestMemoryMmap>,
        head: u16,
        status: GuestAddress,
        io: Io<'_>,
    ) -> io::Result<Option<Outcome>> {
        let (kind, offset, bufs) = match io {
            Io::Read { offset, segs } | Io::Write { offset, segs } => {
                let reading = matches!(io, Io::Read { .. });
                let Some(bufs) = GuestIovecs::new(mem, segs, reading) else {
                    return Ok(Some((status::IOERR, 0)));
                };
                if bufs.is_empty() {
                    return Ok(Some((status::OK, 0)));
                }
                let kind = if reading {
                    Kind::Read
                } else {
                    self.next_write += 1;
                    Kind::Write {
                        seq: self.next_write,
                    }
                };
                (kind, offset, bufs)
            }
            Io::Flush => (Kind::Flush, 0, GuestIovecs::default()),
        };
        let Some(slot) = self.free.pop() else {
            return Err(io::Error::other("more requests than the ring has slots"));
        };
        self.slots[slot] = Some(Op {
            head,
            status,
            kind,
            offset,
            bufs,
            done: 0,
            retries: 0,
            current: Iovecs::default(),
            _mem: mem.clone(),
        });
        match kind {
            Kind::Write { seq } => {
                self.writes.insert(seq);
                self.push(slot)?;
            }
            Kind::Flush if self.writes.first().is_some() => {
                self.parked.push_back((slot, self.next_write + 1));
            }
            _ => self.push(slot)?,
        }
        Ok(None)
    }

    /// Hands the operations pushed so far to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                // An entry the kernel refused at once stops the batch; it has its completion
                // (with the error) and the rest go in the next round.
                Ok(0) => return Err(io::Error::other("the kernel took no submission")),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Processes every completion so far: resubmits the rest of short transfers, starts flushes
    /// whose writes are done, and calls `finished` for each finished request. Call
    /// [`UringQueue::submit`] afterwards.
    pub fn reap(&mut self, mut finished: impl FnMut(Completed)) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        let result = loop {
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes.is_empty() {
                break Ok(());
            }
            if let Err(e) = cqes
                .iter()
                .try_for_each(|&(slot, res)| self.complete(slot as usize, res, &mut finished))
            {
                break Err(e);
            }
        };
        self.cqes = cqes;
        result
    }

    fn complete(
        &mut self,
        slot: usize,
        res: i32,
        finished: &mut impl FnMut(Completed),
    ) -> io::Result<()> {
        self.in_kernel = self.in_kernel.saturating_sub(1);
        let Some(op) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let status = match op.progress(res) {
            Progress::Again => return self.push(slot),
            Progress::Done(status) => status,
        };
        let Some(op) = self.slots[slot].take() else {
            return Ok(());
        };
        self.free.push(slot);
        if let Kind::Write { seq } = op.kind {
            self.writes.remove(&seq);
            self.release_flushes()?;
        }
        finished(Completed {
            head: op.head,
            status: op.status,
            outcome: op.outcome(status),
            kind: op.request_type(),
            bytes: op.done,
        });
        Ok(())
    }

    /// Starts the parked flushes whose earlier writes have all completed.
    fn release_flushes(&mut self) -> io::Result<()> {
        while let Some(&(slot, later)) = self.parked.front() {
            if self.writes.first().is_some_and(|&seq| seq < later) {
                break;
            }
            self.parked.pop_front();
            self.push(slot)?;
        }
        Ok(())
    }

    /// Puts the next operation of the request in `slot` into the submission queue.
    fn push(&mut self, slot: usize) -> io::Result<()> {
        let fd = types::Fd(self.fd);
        let Some(op) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return Err(io::Error::other("no request in slot"));
        };
        let entry = match op.kind {
            Kind::Read => {
                op.bufs.remainder(op.done, &mut op.current);
                opcode::Readv::new(fd, op.current.as_ptr(), op.current.count())
                    .offset(op.offset + op.done)
                    .build()
            }
            Kind::Write { .. } => {
                op.bufs.remainder(op.done, &mut op.current);
                let flags = if self.write_through {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                opcode::Writev::new(fd, op.current.as_ptr(), op.current.count())
                    .offset(op.offset + op.done)
                    .rw_flags(flags)
                    .build()
            }
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: what the kernel will touch stays valid until this operation's completion is
        // reaped, and no op outlives the ring without that (Drop waits for every completion):
        // - the file descriptor: `self._backend` keeps the image open;
        // - the `iovec` array `op.current`: owned by the op in its slot, not changed or freed
        //   before the completion (the slot is reused only after it);
        // - the buffers the `iovec`s point at: ranges of guest memory that vm-memory's checked
        //   slice API gave us (`GuestIovecs::new`), inside mappings that `op._mem` keeps alive.
        //   (Guest memory stays mapped for the VM's lifetime anyway; holding the `Arc` makes
        //   that hold per request even if the VMM ever swaps its memory map.)
        //   The guest may rewrite its descriptors or reuse the buffers while the I/O runs; that
        //   only changes which guest bytes it sees, since the addresses were checked when the
        //   request was started and never reread from the ring.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.in_kernel += 1;
        Ok(())
    }
}

impl Drop for UringQueue {
    /// The kernel may still be reading or writing guest memory and our `iovec`s: wait for every
    /// operation before they are freed. A reset waits for the I/O it interrupts, like hardware
    /// waits for its DMA.
    fn drop(&mut self) {
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // We cannot tell when the kernel is done: keep the buffers and memory alive
                    // for the rest of the process rather than free what it may still write.
                    tracing::error!(
                        "virtio-blk: waiting for {} I/O operations at reset: {e}",
                        self.in_kernel
                    );
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            let n = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::raw::RawFile;
    use super::*;

    /// A ring on a fresh 1 MiB raw image, and the image.
    fn ring_on_image(depth: u16) -> Option<(UringQueue, tempfile::NamedTempFile)> {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let raw = Arc::new(RawFile::open(img.path(), false).unwrap());
        match UringQueue::new(raw, depth, false) {
            Ok(q) => Some((q, img)),
            Err(e) => {
                eprintln!("io_uring unavailable here ({e}); the device tests cover the fallback");
                None
            }
        }
    }

    /// Submits, waits for at least one completion, and returns the finished requests.
    fn round(q: &mut UringQueue) -> Vec<Completed> {
        q.submit().unwrap();
        q.ring.submit_and_wait(1).unwrap();
        let mut done = Vec::new();
        q.reap(|c| done.push(c)).unwrap();
        done
    }

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn a_flush_waits_for_earlier_writes_but_not_later_reads() {
        let Some((mut q, img)) = ring_on_image(8) else {
            return;
        };
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        mem.write_slice(&[0xab; 4096], GuestAddress(0x1000))
            .unwrap();
        img.as_file().write_all_at(&[0xcd; 512], 8192).unwrap();
        let w = [seg(0x1000, 4096)];
        let r = [seg(0x4000, 512)];
        assert_eq!(
            q.start(
                &mem,
                1,
                GuestAddress(1),
                Io::Write {
                    offset: 0,
                    segs: &w
                }
            )
            .unwrap(),
            None
        );
        assert_eq!(q.start(&mem, 2, GuestAddress(2), Io::Flush).unwrap(), None);
        assert_eq!(
            q.start(
                &mem,
                3,
                GuestAddress(3),
                Io::Read {
                    offset: 8192,
                    segs: &r
                }
            )
            .unwrap(),
            None
        );
        // The flush is held back: only the write and the read are in the ring.
        assert_eq!((q.in_flight(), q.in_kernel, q.parked.len()), (3, 2, 1));
        let mut done = Vec::new();
        while done.len() < 2 {
            done.extend(round(&mut q));
        }
        let heads: Vec<u16> = done.iter().map(|c| c.head).collect();
        assert!(heads == [1, 3] || heads == [3, 1], "{heads:?}");
        let what: Vec<(RequestType, u64)> = done.iter().map(|c| (c.kind, c.bytes)).collect();
        assert!(
            what.contains(&(RequestType::Out, 4096)) && what.contains(&(RequestType::In, 512)),
            "{what:?}"
        );
        assert!(done.iter().all(|c| c.outcome.0 == status::OK));
        // The write's completion released the flush.
        assert_eq!((q.in_flight(), q.in_kernel, q.parked.len()), (1, 1, 0));
        assert_eq!(
            round(&mut q),
            vec![Completed {
                head: 2,
                status: GuestAddress(2),
                outcome: (status::OK, 0),
                kind: RequestType::Flush,
                bytes: 0,
            }]
        );
        let mut back = [0u8; 4096];
        img.as_file().read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0xab; 4096]);
        let mut read = [0u8; 512];
        mem.read_slice(&mut read, GuestAddress(0x4000)).unwrap();
        assert_eq!(read, [0xcd; 512]);
        // A flush with no write in flight goes straight to the ring.
        assert_eq!(q.start(&mem, 4, GuestAddress(4), Io::Flush).unwrap(), None);
        assert_eq!(q.in_kernel, 1);
        assert_eq!(round(&mut q).len(), 1);
    }

    #[test]
    fn more_buffers_than_one_readv_takes_are_done_in_steps() {
        let Some((mut q, img)) = ring_on_image(2) else {
            return;
        };
        let pattern: Vec<u8> = (0..(IOV_STEPS * 512)).map(|i| (i / 512) as u8).collect();
        img.as_file().write_all_at(&pattern, 0).unwrap();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap());
        // Every other 512-byte block of guest memory, so no two buffers merge.
        let segs: Vec<_> = (0..IOV_STEPS as u64).map(|i| seg(i * 1024, 512)).collect();
        q.start(
            &mem,
            0,
            GuestAddress(0),
            Io::Read {
                offset: 0,
                segs: &segs,
            },
        )
        .unwrap();
        let done = loop {
            let done = round(&mut q);
            if !done.is_empty() {
                break done;
            }
        };
        assert_eq!(done[0].outcome, (status::OK, (IOV_STEPS * 512) as u32));
        for i in 0..IOV_STEPS as u64 {
            let mut b = [0u8; 512];
            mem.read_slice(&mut b, GuestAddress(i * 1024)).unwrap();
            assert_eq!(b, [i as u8; 512], "buffer {i}");
        }
    }

    /// Buffers in the IOV_MAX test: two readv steps.
    const IOV_STEPS: usize = super::super::iovec::IOV_MAX + 100;

    fn op(kind: Kind, len: u64) -> Op {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let seg = Segment {
            addr: GuestAddress(0x1000),
            len,
        };
        Op {
            head: 3,
            status: GuestAddress(0x10),
            kind,
            offset: 4096,
            bufs: GuestIovecs::new(&mem, &[seg], kind == Kind::Read).unwrap(),
            done: 0,
            retries: 0,
            current: Iovecs::default(),
            _mem: mem,
        }
    }

    #[test]
    fn short_transfers_continue_and_no_progress_fails() {
        let mut r = op(Kind::Read, 4096);
        assert_eq!(r.progress(1000), Progress::Again);
        assert_eq!(r.progress(3000), Progress::Again);
        assert_eq!(r.done, 4000);
        assert_eq!(r.progress(96), Progress::Done(status::OK));
        assert_eq!(r.outcome(status::OK), (status::OK, 4096));
        // End of file part way: the rest never comes.
        let mut r = op(Kind::Read, 4096);
        assert_eq!(r.progress(512), Progress::Again);
        assert_eq!(r.progress(0), Progress::Done(status::IOERR));
        assert_eq!(r.outcome(status::IOERR), (status::IOERR, 0));
        // More than asked for is a broken result, not success.
        let mut w = op(Kind::Write { seq: 1 }, 512);
        assert_eq!(w.progress(513), Progress::Done(status::IOERR));
        let mut w = op(Kind::Write { seq: 1 }, 512);
        assert_eq!(w.progress(512), Progress::Done(status::OK));
        assert_eq!(w.outcome(status::OK), (status::OK, 0));
    }

    #[test]
    fn errors_fail_and_interruptions_retry_a_few_times() {
        let mut r = op(Kind::Read, 512);
        assert_eq!(r.progress(-libc::EIO), Progress::Done(status::IOERR));
        let mut r = op(Kind::Read, 512);
        for _ in 0..MAX_RETRIES {
            assert_eq!(r.progress(-libc::EAGAIN), Progress::Again);
        }
        assert_eq!(r.progress(-libc::EINTR), Progress::Done(status::IOERR));
        let mut f = op(Kind::Flush, 0);
        assert_eq!(f.progress(0), Progress::Done(status::OK));
        let mut f = op(Kind::Flush, 0);
        assert_eq!(f.progress(-libc::EIO), Progress::Done(status::IOERR));
    }
}
