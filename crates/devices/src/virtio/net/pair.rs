//! One queue pair (receiveqN, transmitqN) and its TAP queue, served by a thread of its own.
//!
//! A thread per pair rather than one epoll loop for all: the pairs share nothing but the
//! interrupt handle, and the point of multiqueue is that the guest's per-CPU queues are served
//! in parallel, so one pair's 64 KiB copies never wait behind another's (a single device thread
//! caps the device at one host core). Pair 0's thread also serves the control queue, which is
//! rare and cheap.
//!
//! RX reads the TAP only while the pair is active (see [`super::ctrl::Steering`]) and the driver
//! has buffers posted: otherwise the TAP fd is out of the epoll set, and frames wait in the
//! kernel's TAP queue (bounded, it drops) — never in ours, except the one frame that did not fit
//! the buffers posted so far with `MRG_RXBUF`, which is held until more arrive.
//!
//! With `MRG_RXBUF` a frame is spread over as many chains as it needs (`num_buffers` in the
//! first one's header). Those chains must reach the driver's used ring together: Linux drops a
//! frame whose later buffers it cannot find yet. `virtio-queue` publishes the used index with
//! every `add_used`, so RX writes its used entries itself and publishes them in one store
//! ([`publish_used`]), and decides on interrupts itself ([`wants_interrupt`]).

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{Ctrl, Steering};
use super::device::{MAX_FRAME, feature};
use super::tap::{Tap, VNET_HDR_LEN};
use crate::virtio::GuestMemoryHandle;
use crate::virtio::chain::{ChainError, Desc, collect_chain};
use crate::virtio::counters::counter_set;
use crate::virtio::interrupt::DeviceInterrupt;

/// `virtio_net_hdr` flags and GSO types.
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS: usize = 10;

const RX: usize = 0;
const TX: usize = 1;
const TAP_TOKEN: u64 = 2;
const STEER_TOKEN: u64 = 3;
const CTRL_TOKEN: u64 = 4;
const KILL_TOKEN: u64 = u64::MAX;

/// Why the device needs a reset.
#[derive(Debug)]
pub(super) enum NetError {
    Chain(ChainError),
    /// A device-writable buffer in a TX chain, or a device-readable one in an RX chain (or a
    /// control command without its writable ack byte after the readable part).
    Direction {
        queue: &'static str,
        head: u16,
    },
    Epoll(io::Error),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Chain(e) => write!(f, "{e}"),
            Self::Direction { queue, head } => {
                write!(f, "{queue} chain {head} has buffers in the wrong direction")
            }
            Self::Epoll(e) => write!(f, "epoll: {e}"),
        }
    }
}

impl From<ChainError> for NetError {
    fn from(e: ChainError) -> Self {
        Self::Chain(e)
    }
}

impl From<virtio_queue::Error> for NetError {
    fn from(e: virtio_queue::Error) -> Self {
        Self::Chain(ChainError::Ring(e))
    }
}

counter_set! {
    /// One pair's traffic, in Cloud Hypervisor's names; bytes are Ethernet frames without the
    /// virtio-net header. Dropped: frames that never reached the TAP or the driver (unusable,
    /// too big for the buffers, refused by the TAP). Aligned so that pairs, each counting on
    /// its own thread, never write to one cache line.
    #[repr(align(64))]
    pub struct PairCounters {
        rx_bytes,
        rx_frames,
        rx_dropped,
        tx_bytes,
        tx_frames,
        tx_dropped,
    }
}

/// A queue of the pair: the ring, the eventfd the driver's notifications arrive on, and its
/// index in the device (for the interrupt's vector).
pub(super) struct PairQueue {
    pub queue: Queue,
    pub event: EventFd,
    pub index: usize,
}

/// What a pair thread is started with.
pub(super) struct PairSpec {
    pub pair: usize,
    pub tap: Tap,
    pub mem: GuestMemoryHandle,
    pub interrupt: DeviceInterrupt,
    pub features: u64,
    pub rx: PairQueue,
    pub tx: PairQueue,
    pub steering: Arc<Steering>,
    /// The control queue, on pair 0's thread.
    pub ctrl: Option<Ctrl>,
    pub kill: EventFd,
    pub counters: Arc<PairCounters>,
}

/// Progress of one pass over a queue.
struct Pass {
    used: bool,
    /// A batch limit was hit: come back without sleeping.
    more: bool,
}

/// What became of a frame offered to the RX ring.
enum Delivery {
    Done,
    /// Not enough buffers posted yet: the frame is held until the driver posts more.
    NoRoom,
    /// It can never fit (larger than the chain, or than the whole ring): dropped.
    Dropped,
}

pub(super) struct PairThread {
    pair: usize,
    tap: Tap,
    mem: GuestMemoryHandle,
    interrupt: DeviceInterrupt,
    features: u64,
    queues: [PairQueue; 2],
    steering: Arc<Steering>,
    steer: EventFd,
    ctrl: Option<Ctrl>,
    epoll: Epoll,
    /// The TAP fd is in the epoll set: the pair is active and the driver has RX buffers, as far
    /// as we know.
    tap_armed: bool,
    buf: Vec<u8>,
    /// Length of a received frame in `buf` still waiting for RX buffers.
    pending: Option<usize>,
    /// The used index of RX when we last decided about an interrupt.
    rx_signalled: u16,
    /// The driver notifies us of new RX buffers. Only wanted while we are out of them: a
    /// notification per refill is an exit per refill.
    rx_notify: bool,
    warned: bool,
    counters: Arc<PairCounters>,
}

impl PairThread {
    pub(super) fn new(spec: PairSpec) -> io::Result<(Self, EventFd)> {
        let steer = spec.steering.wake_fd(spec.pair)?;
        let epoll = Epoll::new()?;
        let mut fds = vec![
            (spec.kill.as_raw_fd(), KILL_TOKEN),
            (spec.rx.event.as_raw_fd(), RX as u64),
            (spec.tx.event.as_raw_fd(), TX as u64),
            (steer.as_raw_fd(), STEER_TOKEN),
        ];
        if let Some(c) = &spec.ctrl {
            fds.push((c.event_fd(), CTRL_TOKEN));
        }
        for (fd, token) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let rx_signalled = spec.rx.queue.next_used();
        let thread = Self {
            pair: spec.pair,
            tap: spec.tap,
            mem: spec.mem,
            interrupt: spec.interrupt,
            features: spec.features,
            queues: [spec.rx, spec.tx],
            steering: spec.steering,
            steer,
            ctrl: spec.ctrl,
            epoll,
            tap_armed: false,
            buf: vec![0u8; MAX_FRAME],
            pending: None,
            rx_signalled,
            rx_notify: true,
            warned: false,
            counters: spec.counters,
        };
        Ok((thread, spec.kill))
    }

    fn active(&self) -> bool {
        self.steering.is_active(self.pair)
    }

    pub(super) fn run(mut self) {
        if self.active() {
            if let Err(e) = self.arm_tap(true) {
                self.interrupt.set_needs_reset(&e);
                return;
            }
        }
        let mut ready = [EpollEvent::default(); 8];
        // A first pass without waiting: the driver may have posted and notified already.
        let mut more = true;
        loop {
            let timeout = if more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll_wait: {e}");
                    return;
                }
            };
            let mut result = Ok(());
            for ev in &ready[..n] {
                result = result.and_then(|()| self.event(ev.data()));
                if ev.data() == KILL_TOKEN {
                    return;
                }
            }
            match result.and_then(|()| self.serve()) {
                Ok(m) => more = m,
                Err(e) => {
                    // Broken queue: stop touching guest memory; the kill eventfd ends us.
                    self.interrupt.set_needs_reset(&e);
                    return;
                }
            }
        }
    }

    fn event(&mut self, token: u64) -> Result<(), NetError> {
        match token {
            KILL_TOKEN | TAP_TOKEN => Ok(()),
            STEER_TOKEN => {
                let _ = self.steer.read();
                // Inactive: the TAP queue is detached and must leave the epoll set (a detached
                // queue polls as an error, whatever events we ask for).
                self.arm_tap(self.active())
            }
            CTRL_TOKEN => {
                let guard = self.mem.memory();
                let Some(ctrl) = self.ctrl.as_mut() else {
                    return Ok(());
                };
                ctrl.serve(&guard, &self.interrupt)
            }
            q => {
                if let Some(pq) = self.queues.get(q as usize) {
                    let _ = pq.event.read();
                }
                if q == RX as u64 && self.active() {
                    self.arm_tap(true)?;
                }
                Ok(())
            }
        }
    }

    fn arm_tap(&mut self, on: bool) -> Result<(), NetError> {
        if self.tap_armed == on {
            return Ok(());
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll
            .ctl(
                op,
                self.tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TAP_TOKEN),
            )
            .map_err(NetError::Epoll)?;
        self.tap_armed = on;
        Ok(())
    }

    /// One pass over TX then RX; interrupts the driver; true if a batch limit was hit.
    fn serve(&mut self) -> Result<bool, NetError> {
        let mem_guard = self.mem.memory();
        let mem: &GuestMemoryMmap = &mem_guard;
        let tx = self.process_tx(mem)?;
        let rx = if self.tap_armed {
            self.fill_rx(mem)?
        } else {
            Pass {
                used: false,
                more: false,
            }
        };
        if rx.used {
            let new = self.queues[RX].queue.next_used();
            let old = std::mem::replace(&mut self.rx_signalled, new);
            if wants_interrupt(&self.queues[RX].queue, mem, old, new)? {
                self.signal(RX);
            }
        }
        if tx.used && self.queues[TX].queue.needs_notification(mem)? {
            self.signal(TX);
        }
        Ok(tx.more || rx.more)
    }

    fn signal(&self, q: usize) {
        if let Err(e) = self.interrupt.signal_queue(self.queues[q].index) {
            tracing::warn!("virtio-net: interrupt: {e}");
        }
    }

    fn warn_once(&mut self, what: &dyn fmt::Display) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                "virtio-net {} pair {}: {what} (further drops not logged)",
                self.tap.name(),
                self.pair
            );
        } else {
            tracing::debug!("virtio-net {}: {what}", self.tap.name());
        }
    }

    /// Sends the driver's frames to the TAP, at most a queue's worth per pass.
    fn process_tx(&mut self, mem: &GuestMemoryMmap) -> Result<Pass, NetError> {
        let mut used = false;
        let mut budget = self.queues[TX].queue.size();
        loop {
            let q = &mut self.queues[TX].queue;
            q.disable_notification(mem)?;
            check_avail(q, mem)?;
            while budget > 0 {
                let Some(chain) = self.queues[TX].queue.pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let descs = collect_chain(chain, mem)?;
                if descs.iter().any(|d| d.write_only) {
                    return Err(NetError::Direction { queue: "TX", head });
                }
                self.send_frame(mem, &descs)?;
                self.queues[TX].queue.add_used(mem, head, 0)?;
                used = true;
            }
            if budget == 0 {
                return Ok(Pass { used, more: true });
            }
            if !self.queues[TX].queue.enable_notification(mem)? {
                return Ok(Pass { used, more: false });
            }
        }
    }

    /// One TX chain to the TAP; a frame that cannot be sent is dropped (as a NIC would).
    fn send_frame(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<(), NetError> {
        let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        if total < VNET_HDR_LEN as u64 || total > self.buf.len() as u64 {
            self.counters.tx_dropped.inc();
            self.warn_once(&format_args!("dropped a TX frame of {total} bytes"));
            return Ok(());
        }
        let mut at = 0usize;
        for d in descs {
            let n = d.len as usize;
            mem.read_slice(&mut self.buf[at..at + n], d.addr)
                .map_err(|_| ChainError::BadBuffer {
                    addr: d.addr.0,
                    len: d.len,
                })?;
            at += n;
        }
        if let Err(why) = check_tx_header(&self.buf[..VNET_HDR_LEN], self.features) {
            self.counters.tx_dropped.inc();
            self.warn_once(&format_args!("dropped a TX frame: {why}"));
            return Ok(());
        }
        loop {
            match self.tap.write_frame(&self.buf[..at]) {
                Ok(_) => {
                    self.counters.tx_frames.inc();
                    self.counters.tx_bytes.add((at - VNET_HDR_LEN) as u64);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.counters.tx_dropped.inc();
                    self.warn_once(&format_args!("TAP write of {at} bytes: {e}"));
                    return Ok(());
                }
            }
        }
    }

    /// Moves frames from the TAP into the driver's RX chains while it has some posted.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap) -> Result<Pass, NetError> {
        if self.rx_notify {
            // We have buffers (or are about to look): until they run out, refills need no kick.
            self.queues[RX].queue.disable_notification(mem)?;
            self.rx_notify = false;
        }
        let mut used = false;
        let mut budget = self.queues[RX].queue.size();
        let mut rechecked = false;
        loop {
            if budget == 0 {
                return Ok(Pass { used, more: true });
            }
            check_avail(&self.queues[RX].queue, mem)?;
            let len = match self.pending {
                Some(len) => len,
                None if !has_avail(&self.queues[RX].queue, mem)? => 0,
                None => match self.tap.read_frame(&mut self.buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        self.counters.rx_dropped.inc();
                        budget -= 1;
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            // The TAP is gone or its queue detached: wait for the next RX
                            // notification or steering change.
                            self.warn_once(&format_args!("TAP read: {e}"));
                            self.arm_tap(false)?;
                        }
                        return Ok(Pass { used, more: false });
                    }
                },
            };
            let delivery = if len == 0 {
                Delivery::NoRoom
            } else {
                budget -= 1;
                self.deliver(mem, len)?
            };
            match delivery {
                Delivery::Done => {
                    self.pending = None;
                    used = true;
                    rechecked = false;
                }
                Delivery::Dropped => self.pending = None,
                Delivery::NoRoom => {
                    self.pending = (len > 0).then_some(len);
                    // Out of buffers: ask to be notified, and look once more for a racing post.
                    self.rx_notify = true;
                    if !rechecked && self.queues[RX].queue.enable_notification(mem)? {
                        rechecked = true;
                        continue;
                    }
                    self.arm_tap(false)?;
                    return Ok(Pass { used, more: false });
                }
            }
        }
    }

    /// Puts the `len`-byte frame in `buf` into the RX ring: one chain, or with `MRG_RXBUF` as
    /// many as it takes, published together.
    fn deliver(&mut self, mem: &GuestMemoryMmap, len: usize) -> Result<Delivery, NetError> {
        let mergeable = self.features & feature::MRG_RXBUF != 0;
        let q = &mut self.queues[RX].queue;
        let mut chains: Vec<(u16, Vec<Desc>)> = Vec::new();
        let mut cap = 0u64;
        let mut descriptors = 0usize;
        while cap < len as u64 && (chains.is_empty() || mergeable) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs = collect_chain(chain, mem)?;
            if descs.iter().any(|d| !d.write_only) {
                return Err(NetError::Direction { queue: "RX", head });
            }
            let chain_cap: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
            cap += chain_cap;
            descriptors += descs.len();
            chains.push((head, descs));
        }
        if cap < len as u64 {
            // Give the chains back; the frame waits for more, unless it never can fit: one
            // chain too small without MRG_RXBUF, or with it, buffers that already fill the
            // descriptor table (the driver cannot post more while we hold them).
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            let never = if mergeable {
                descriptors >= usize::from(q.size())
            } else {
                !chains.is_empty()
            };
            if never {
                self.counters.rx_dropped.inc();
                self.warn_once(&format_args!(
                    "dropped an RX frame of {len} bytes for {cap} bytes of buffers"
                ));
                return Ok(Delivery::Dropped);
            }
            return Ok(Delivery::NoRoom);
        }
        // The TAP leaves num_buffers alone; it is ours to fill.
        let count = chains.len() as u16;
        self.buf[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
        let mut at = 0usize;
        let mut used = Vec::with_capacity(chains.len());
        for (head, descs) in &chains {
            let start = at;
            for d in descs {
                if at == len {
                    break;
                }
                let n = (d.len as usize).min(len - at);
                let bad = || ChainError::BadBuffer {
                    addr: d.addr.0,
                    len: d.len,
                };
                mem.write_slice(&self.buf[at..at + n], d.addr)
                    .map_err(|_| bad())?;
                // Keep the address arithmetic honest for the next descriptor.
                d.addr.checked_add(n as u64).ok_or_else(bad)?;
                at += n;
            }
            used.push((*head, (at - start) as u32));
        }
        // Counted before the driver can see the frame, so its completion implies the count.
        self.counters.rx_frames.inc();
        self.counters.rx_bytes.add((len - VNET_HDR_LEN) as u64);
        publish_used(q, mem, &used)?;
        Ok(Delivery::Done)
    }
}

/// The driver's avail index is at most a queue's worth ahead of us (else the ring is garbage).
fn check_avail(q: &Queue, mem: &GuestMemoryMmap) -> Result<(), NetError> {
    let avail = q.avail_idx(mem, Ordering::Acquire)?.0;
    let next = q.next_avail();
    if avail.wrapping_sub(next) > q.size() {
        return Err(ChainError::AvailIndex { avail, next }.into());
    }
    Ok(())
}

/// Whether the driver has posted a chain we have not taken yet.
fn has_avail(q: &Queue, mem: &GuestMemoryMmap) -> Result<bool, NetError> {
    Ok(q.avail_idx(mem, Ordering::Acquire)?.0 != q.next_avail())
}

/// Writes `(head, len)` used elements from the queue's next used slot on, then the used index
/// once, so the driver sees all of them or none.
pub(super) fn publish_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    elems: &[(u16, u32)],
) -> Result<(), NetError> {
    let size = q.size();
    let ring = GuestAddress(q.used_ring());
    let mut next = q.next_used();
    for &(head, len) in elems {
        if head >= size {
            return Err(ChainError::Ring(virtio_queue::Error::InvalidDescriptorIndex).into());
        }
        let slot = 4 + 8 * u64::from(next % size);
        let addr = ring
            .checked_add(slot)
            .ok_or(ChainError::Ring(virtio_queue::Error::AddressOverflow))?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(|e| ChainError::Ring(virtio_queue::Error::GuestMemory(e)))?;
        next = next.wrapping_add(1);
    }
    let idx = ring
        .checked_add(2)
        .ok_or(ChainError::Ring(virtio_queue::Error::AddressOverflow))?;
    mem.store(next.to_le(), idx, Ordering::Release)
        .map_err(|e| ChainError::Ring(virtio_queue::Error::GuestMemory(e)))?;
    q.set_next_used(next);
    Ok(())
}

/// Whether the driver wants an interrupt for the used entries `old..new` (virtio 1.2 §2.7.10):
/// `used_event` with `EVENT_IDX`, else the avail ring's `NO_INTERRUPT` flag.
pub(super) fn wants_interrupt(
    q: &Queue,
    mem: &GuestMemoryMmap,
    old: u16,
    new: u16,
) -> Result<bool, NetError> {
    // The used index we published must be visible before we read what the driver asked for.
    fence(Ordering::SeqCst);
    let ring = GuestAddress(q.avail_ring());
    let overflow = || ChainError::Ring(virtio_queue::Error::AddressOverflow);
    let read = |off: u64| -> Result<u16, NetError> {
        let addr = ring.checked_add(off).ok_or_else(overflow)?;
        let v: u16 = mem
            .load(addr, Ordering::Acquire)
            .map_err(|e| ChainError::Ring(virtio_queue::Error::GuestMemory(e)))?;
        Ok(u16::from_le(v))
    };
    if q.event_idx_enabled() {
        let used_event = read(4 + 2 * u64::from(q.size()))?;
        Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
    } else {
        Ok(read(0)? & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }
}

/// Checks a transmitted header asks only for offloads the driver negotiated.
pub(super) fn check_tx_header(hdr: &[u8], features: u64) -> Result<(), String> {
    let (flags, gso) = (hdr[0], hdr[1]);
    if flags & HDR_F_NEEDS_CSUM != 0 && features & feature::CSUM == 0 {
        return Err("NEEDS_CSUM without VIRTIO_NET_F_CSUM".into());
    }
    let need = match gso & !GSO_ECN {
        GSO_NONE => 0,
        GSO_TCPV4 => feature::HOST_TSO4,
        GSO_TCPV6 => feature::HOST_TSO6,
        other => return Err(format!("GSO type {other} not offered")),
    };
    if gso & !GSO_ECN == GSO_NONE && gso & GSO_ECN != 0 {
        return Err("ECN bit without a GSO type".into());
    }
    if features & need != need || (gso & GSO_ECN != 0 && features & feature::HOST_ECN == 0) {
        return Err(format!("GSO type {gso:#x} not negotiated"));
    }
    Ok(())
}
