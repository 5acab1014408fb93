//! The virtio-vsock device (id 19): three queues (rx, tx, event), the guest's CID in its
//! configuration, and a thread that serves the queues and the [`Muxer`]'s host sockets.
//!
//! The event queue only carries transport resets (after a migration, which we do not do), so
//! the device runs on rx and tx alone: a vhost-user frontend (QEMU's vhost-user-vsock) keeps
//! the event queue to itself and hands the backend only those two. When the event queue is
//! there, its notifications are drained and nothing else.
//!
//! The thread waits in one epoll on the queue eventfds and the muxer's epoll fd (so a host
//! socket wakes it as a guest notification does). It owns the muxer while the device runs and
//! hands it back when stopped, so the listening socket outlives device resets.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{self, HDR_LEN, MAX_PKT_DATA, op};
use crate::virtio::chain::{ChainError, collect_chain};
use crate::virtio::counters::counter_set;
use crate::virtio::device::{ActivateError, ActivatedQueue, VirtioDevice};
use crate::virtio::interrupt::DeviceInterrupt;
use crate::virtio::{GuestMemoryHandle, features};

const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const MUXER_TOKEN: u64 = 3;
const KILL_TOKEN: u64 = u64::MAX;

counter_set! {
    /// Packets moved between the guest and the device (well-formed ones; a malformed TX packet
    /// counts nothing), and the stream data (RW payload bytes) they carried.
    pub struct VsockCounters {
        rx_bytes,
        rx_packets,
        tx_bytes,
        tx_packets,
    }
}

/// The virtio socket device with its host side on Unix sockets.
pub struct Vsock {
    cid: u64,
    /// `None` while the device thread owns it.
    muxer: Option<Muxer>,
    worker: Option<Worker>,
    counters: Arc<VsockCounters>,
}

struct Worker {
    kill: EventFd,
    handle: JoinHandle<Muxer>,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `socket` (see [`Muxer`]).
    pub fn new(cid: u64, socket: &Path) -> io::Result<Self> {
        Ok(Self {
            cid,
            muxer: Some(Muxer::bind(cid, socket)?),
            worker: None,
            counters: Arc::default(),
        })
    }

    /// What the device has carried since it was built (across driver resets).
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::BASE
    }

    fn config_size(&self) -> usize {
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cid = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| cid.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        _features: u64,
        queues: Vec<ActivatedQueue>,
        interrupt: DeviceInterrupt,
    ) -> Result<(), ActivateError> {
        self.reset();
        let got = queues.len();
        let mut slots: [Option<(Queue, EventFd)>; 3] = [None, None, None];
        for q in queues {
            if let Some(slot) = slots.get_mut(q.index) {
                *slot = Some((q.queue, q.event));
            }
        }
        let [Some(rx), Some(tx), event] = slots else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let Some(muxer) = self.muxer.take() else {
            return Err(ActivateError::Other("vsock muxer lost".into()));
        };
        let kill = EventFd::new(0).map_err(ActivateError::Thread)?;
        let setup = (|| -> io::Result<(Epoll, EventFd)> {
            let epoll = Epoll::new()?;
            let add = |fd, token| {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
            };
            add(kill.as_raw_fd(), KILL_TOKEN)?;
            add(rx.1.as_raw_fd(), RX as u64)?;
            add(tx.1.as_raw_fd(), TX as u64)?;
            if let Some((_, ev)) = &event {
                add(ev.as_raw_fd(), EVENT as u64)?;
            }
            add(muxer.epoll_fd(), MUXER_TOKEN)?;
            Ok((epoll, kill.try_clone()?))
        })();
        let (epoll, thread_kill) = match setup {
            Ok(s) => s,
            Err(e) => {
                self.muxer = Some(muxer);
                return Err(ActivateError::Thread(e));
            }
        };
        let thread = Thread {
            muxer,
            mem,
            interrupt,
            queues: [rx.0, tx.0],
            events: [rx.1, tx.1],
            event: event.map(|(_, ev)| ev),
            epoll,
            kill: thread_kill,
            buf: vec![0u8; MAX_PKT_DATA as usize],
            counters: self.counters.clone(),
        };
        match std::thread::Builder::new()
            .name("virtio-vsock".into())
            .spawn(move || thread.run())
        {
            Ok(handle) => {
                self.worker = Some(Worker { kill, handle });
                Ok(())
            }
            Err(e) => {
                // The closure (and the muxer in it) is gone; rebind is not possible here.
                Err(ActivateError::Thread(e))
            }
        }
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.kill.write(1);
            match w.handle.join() {
                Ok(mut muxer) => {
                    muxer.reset();
                    self.muxer = Some(muxer);
                }
                Err(_) => tracing::error!("virtio-vsock thread panicked"),
            }
        }
    }
}

/// What the device thread owns.
struct Thread {
    muxer: Muxer,
    mem: GuestMemoryHandle,
    interrupt: DeviceInterrupt,
    queues: [Queue; 2],
    events: [EventFd; 2],
    /// The event queue's notifications, if the transport has that queue: only drained.
    event: Option<EventFd>,
    epoll: Epoll,
    kill: EventFd,
    buf: Vec<u8>,
    counters: Arc<VsockCounters>,
}

impl Thread {
    fn run(mut self) -> Muxer {
        let mut ready = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait: {e}");
                    return self.park();
                }
            };
            for ev in &ready[..n] {
                match ev.data() {
                    KILL_TOKEN => return self.muxer,
                    MUXER_TOKEN => self.muxer.process_host_events(),
                    q if q == EVENT as u64 => {
                        if let Some(evt) = &self.event {
                            let _ = evt.read();
                        }
                    }
                    q => {
                        if let Some(evt) = self.events.get(q as usize) {
                            let _ = evt.read();
                        }
                    }
                }
            }
            if let Err(e) = self.serve() {
                self.interrupt.set_needs_reset(&e);
                return self.park();
            }
        }
    }

    /// The device is broken: drop every stream and wait to be stopped.
    fn park(mut self) -> Muxer {
        self.muxer.reset();
        let _ = self.kill.read();
        self.muxer
    }

    /// Moves packets until neither direction can make progress, then interrupts the driver.
    fn serve(&mut self) -> Result<(), ChainError> {
        let guard = self.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let (mut tx_used, mut rx_used) = (false, false);
        loop {
            let tx = self.process_tx(mem)?;
            let rx = self.fill_rx(mem)?;
            tx_used |= tx;
            rx_used |= rx;
            if !tx && !rx {
                break;
            }
        }
        for (used, q) in [(rx_used, RX), (tx_used, TX)] {
            if used && self.queues[q].needs_notification(mem)? {
                if let Err(e) = self.interrupt.signal_queue(q) {
                    tracing::warn!("virtio-vsock: interrupt: {e}");
                }
            }
        }
        Ok(())
    }

    fn check_avail(q: &Queue, mem: &GuestMemoryMmap) -> Result<(), ChainError> {
        let avail = q.avail_idx(mem, Ordering::Acquire)?.0;
        let next = q.next_avail();
        if avail.wrapping_sub(next) > q.size() {
            return Err(ChainError::AvailIndex { avail, next });
        }
        Ok(())
    }

    /// Takes the guest's packets (unless RX is backed up with control packets).
    fn process_tx(&mut self, mem: &GuestMemoryMmap) -> Result<bool, ChainError> {
        let mut used = false;
        loop {
            let q = &mut self.queues[TX];
            q.disable_notification(mem)?;
            Self::check_avail(q, mem)?;
            while !self.muxer.control_full() {
                let q = &mut self.queues[TX];
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let descs = collect_chain(chain, mem)?;
                match packet::read_tx(mem, &descs)? {
                    Ok((hdr, data)) => {
                        self.counters.tx_packets.inc();
                        if hdr.op == op::RW {
                            self.counters.tx_bytes.add(data.len() as u64);
                        }
                        self.muxer.handle_tx(&hdr, &data)
                    }
                    Err((hdr, why)) => self.muxer.handle_bad_tx(hdr, &why),
                }
                self.queues[TX].add_used(mem, head, 0)?;
                used = true;
            }
            if self.muxer.control_full() || !self.queues[TX].enable_notification(mem)? {
                return Ok(used);
            }
        }
    }

    /// Gives the guest what the muxer has for it, one packet per RX buffer.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap) -> Result<bool, ChainError> {
        let mut used = false;
        let mut rechecked = false;
        while self.muxer.has_rx() {
            let q = &mut self.queues[RX];
            Self::check_avail(q, mem)?;
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Out of buffers: ask to be notified, and look once more for a racing post.
                if !rechecked && q.enable_notification(mem)? {
                    rechecked = true;
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let descs = collect_chain(chain, mem)?;
            let cap = packet::rx_capacity(&descs);
            if cap < HDR_LEN as u64 {
                // Useless buffer: give it back empty.
                self.queues[RX].add_used(mem, head, 0)?;
                used = true;
                continue;
            }
            let room = (cap - HDR_LEN as u64).min(self.buf.len() as u64) as usize;
            match self.muxer.next_rx(&mut self.buf[..room]) {
                Some((hdr, n)) => {
                    let written = packet::write_rx(mem, &descs, &hdr, &self.buf[..n])?;
                    self.counters.rx_packets.inc();
                    self.counters.rx_bytes.add(n as u64);
                    self.queues[RX].add_used(mem, head, written)?;
                    used = true;
                }
                None => {
                    self.queues[RX].go_to_previous_position();
                    break;
                }
            }
        }
        Ok(used)
    }
}
