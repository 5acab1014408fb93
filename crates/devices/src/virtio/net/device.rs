//! The virtio-net device (id 1): one queue pair (receiveq1 = 0, transmitq1 = 1), the MAC and
//! link status in its configuration, and one thread that serves both queues and the TAP fd.
//!
//! Frames carry `virtio_net_hdr_v1` (12 bytes) in front, exactly as the TAP reads and writes
//! them (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12), so checksum and TSO offloads pass through: the
//! driver's `GUEST_*` choices become the TAP's `TUNSETOFFLOAD`; its `HOST_*` ones decide which
//! transmitted headers we accept. No `MRG_RXBUF`: every received frame goes into one chain
//! (a driver that takes TSO frames posts 64 KiB chains, as the spec asks).
//!
//! RX reads the TAP only while the driver has buffers posted: when the ring is empty the TAP fd
//! leaves the epoll set until the driver notifies the RX queue, so frames wait in the kernel's
//! TAP queue (bounded, it drops) and never in ours.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, VNET_HDR_LEN, offload};
use crate::virtio::chain::{ChainError, Desc, collect_chain};
use crate::virtio::device::{ActivateError, ActivatedQueue, VirtioDevice};
use crate::virtio::interrupt::DeviceInterrupt;
use crate::virtio::{GuestMemoryHandle, features};

/// Device feature bits (virtio 1.2 §5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// `virtio_net_hdr` flags and GSO types.
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;

const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;
const TAP_TOKEN: u64 = 2;
const KILL_TOKEN: u64 = u64::MAX;
/// The largest frame in either direction, header included: a 64 KiB TSO frame with an
/// Ethernet + VLAN header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 18;
/// Configuration: mac[6], status u16, max_virtqueue_pairs u16.
const CONFIG_SIZE: usize = 10;

/// The virtio network device on a TAP.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    worker: Option<Worker>,
}

struct Worker {
    kill: EventFd,
    handle: JoinHandle<()>,
}

impl Net {
    /// A device on `tap` with `mac`, or a random locally administered unicast MAC.
    pub fn new(tap: Tap, mac: Option<[u8; 6]>) -> io::Result<Self> {
        let mac = match mac {
            Some(m) => m,
            None => random_mac()?,
        };
        Ok(Self {
            tap,
            mac,
            worker: None,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

/// A random MAC with the locally administered bit set and the multicast bit clear.
pub fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    getrandom::fill(&mut mac).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

/// The TAP offloads matching what the driver accepts on receive.
fn tap_offload(features: u64) -> u32 {
    if features & feature::GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = offload::CSUM;
    if features & feature::GUEST_TSO4 != 0 {
        f |= offload::TSO4;
    }
    if features & feature::GUEST_TSO6 != 0 {
        f |= offload::TSO6;
    }
    if features & feature::GUEST_ECN != 0 && f & (offload::TSO4 | offload::TSO6) != 0 {
        f |= offload::TSO_ECN;
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::BASE
            | feature::MAC
            | feature::STATUS
            | feature::CSUM
            | feature::GUEST_CSUM
            | feature::GUEST_TSO4
            | feature::GUEST_TSO6
            | feature::GUEST_ECN
            | feature::HOST_TSO4
            | feature::HOST_TSO6
            | feature::HOST_ECN
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| cfg.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        features: u64,
        queues: Vec<ActivatedQueue>,
        interrupt: DeviceInterrupt,
    ) -> Result<(), ActivateError> {
        self.reset();
        let got = queues.len();
        let mut slots: [Option<(Queue, EventFd)>; 2] = [None, None];
        for q in queues {
            if let Some(slot) = slots.get_mut(q.index) {
                *slot = Some((q.queue, q.event));
            }
        }
        let [Some(rx), Some(tx)] = slots else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        self.tap.set_offload(tap_offload(features)).map_err(|e| {
            ActivateError::Other(format!("TAP {}: TUNSETOFFLOAD: {e}", self.tap.name()))
        })?;
        let kill = EventFd::new(0).map_err(ActivateError::Thread)?;
        let tap = self.tap.try_clone().map_err(ActivateError::Thread)?;
        let epoll = (|| -> io::Result<Epoll> {
            let epoll = Epoll::new()?;
            for (fd, token) in [
                (kill.as_raw_fd(), KILL_TOKEN),
                (rx.1.as_raw_fd(), RX as u64),
                (tx.1.as_raw_fd(), TX as u64),
                (tap.as_raw_fd(), TAP_TOKEN),
            ] {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )?;
            }
            Ok(epoll)
        })()
        .map_err(ActivateError::Thread)?;
        let thread = Thread {
            tap,
            mem,
            interrupt,
            features,
            queues: [rx.0, tx.0],
            events: [rx.1, tx.1],
            epoll,
            tap_armed: true,
            buf: vec![0u8; MAX_FRAME],
            warned: false,
        };
        let handle = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || thread.run())
            .map_err(ActivateError::Thread)?;
        self.worker = Some(Worker { kill, handle });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.kill.write(1);
            if w.handle.join().is_err() {
                tracing::error!("virtio-net thread panicked");
            }
        }
    }
}

/// Why the device needs a reset.
#[derive(Debug)]
enum NetError {
    Chain(ChainError),
    /// A device-writable buffer in a TX chain, or a device-readable one in an RX chain.
    Direction {
        queue: usize,
        head: u16,
    },
    Epoll(io::Error),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Chain(e) => write!(f, "{e}"),
            Self::Direction { queue: RX, head } => {
                write!(f, "device-readable buffer in RX chain {head}")
            }
            Self::Direction { head, .. } => {
                write!(f, "device-writable buffer in TX chain {head}")
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

/// What the device thread owns.
struct Thread {
    tap: Tap,
    mem: GuestMemoryHandle,
    interrupt: DeviceInterrupt,
    features: u64,
    queues: [Queue; 2],
    events: [EventFd; 2],
    epoll: Epoll,
    /// The TAP fd is in the epoll set (the driver has RX buffers, as far as we know).
    tap_armed: bool,
    buf: Vec<u8>,
    warned: bool,
}

/// Progress of one pass over a queue.
struct Pass {
    used: bool,
    /// A batch limit was hit: come back without sleeping.
    more: bool,
}

impl Thread {
    fn run(mut self) {
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
            for ev in &ready[..n] {
                match ev.data() {
                    KILL_TOKEN => return,
                    TAP_TOKEN => {}
                    q => {
                        if let Some(evt) = self.events.get(q as usize) {
                            let _ = evt.read();
                        }
                        if q == RX as u64 {
                            if let Err(e) = self.arm_tap(true) {
                                self.interrupt.set_needs_reset(&e);
                                return;
                            }
                        }
                    }
                }
            }
            match self.serve() {
                Ok(m) => more = m,
                Err(e) => {
                    // Broken queue: stop touching guest memory; the kill eventfd ends us.
                    self.interrupt.set_needs_reset(&e);
                    return;
                }
            }
        }
    }

    fn arm_tap(&mut self, on: bool) -> Result<(), NetError> {
        if self.tap_armed == on {
            return Ok(());
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        self.epoll
            .ctl(
                ControlOperation::Modify,
                self.tap.as_raw_fd(),
                EpollEvent::new(events, TAP_TOKEN),
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
        for (used, q) in [(rx.used, RX), (tx.used, TX)] {
            if used && self.queues[q].needs_notification(mem)? {
                if let Err(e) = self.interrupt.signal_queue(q) {
                    tracing::warn!("virtio-net: interrupt: {e}");
                }
            }
        }
        Ok(tx.more || rx.more)
    }

    fn check_avail(q: &Queue, mem: &GuestMemoryMmap) -> Result<(), NetError> {
        let avail = q.avail_idx(mem, Ordering::Acquire)?.0;
        let next = q.next_avail();
        if avail.wrapping_sub(next) > q.size() {
            return Err(ChainError::AvailIndex { avail, next }.into());
        }
        Ok(())
    }

    fn warn_once(&mut self, what: &dyn fmt::Display) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                "virtio-net {}: {what} (further drops not logged)",
                self.tap.name()
            );
        } else {
            tracing::debug!("virtio-net {}: {what}", self.tap.name());
        }
    }

    /// Sends the driver's frames to the TAP, at most a queue's worth per pass.
    fn process_tx(&mut self, mem: &GuestMemoryMmap) -> Result<Pass, NetError> {
        let mut used = false;
        let mut budget = self.queues[TX].size();
        loop {
            self.queues[TX].disable_notification(mem)?;
            Self::check_avail(&self.queues[TX], mem)?;
            while budget > 0 {
                let Some(chain) = self.queues[TX].pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let descs = collect_chain(chain, mem)?;
                if descs.iter().any(|d| d.write_only) {
                    return Err(NetError::Direction { queue: TX, head });
                }
                self.send_frame(mem, &descs)?;
                self.queues[TX].add_used(mem, head, 0)?;
                used = true;
            }
            if budget == 0 {
                return Ok(Pass { used, more: true });
            }
            if !self.queues[TX].enable_notification(mem)? {
                return Ok(Pass { used, more: false });
            }
        }
    }

    /// One TX chain to the TAP; a frame that cannot be sent is dropped (as a NIC would).
    fn send_frame(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<(), NetError> {
        let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        if total < VNET_HDR_LEN as u64 || total > self.buf.len() as u64 {
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
            self.warn_once(&format_args!("dropped a TX frame: {why}"));
            return Ok(());
        }
        loop {
            match self.tap.write_frame(&self.buf[..at]) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.warn_once(&format_args!("TAP write of {at} bytes: {e}"));
                    return Ok(());
                }
            }
        }
    }

    /// Moves frames from the TAP into the driver's RX chains while it has some posted.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap) -> Result<Pass, NetError> {
        let mut used = false;
        let mut budget = self.queues[RX].size();
        let mut rechecked = false;
        loop {
            if budget == 0 {
                return Ok(Pass { used, more: true });
            }
            Self::check_avail(&self.queues[RX], mem)?;
            let Some(chain) = self.queues[RX].pop_descriptor_chain(mem) else {
                // Out of buffers: ask to be notified, and look once more for a racing post.
                if !rechecked && self.queues[RX].enable_notification(mem)? {
                    rechecked = true;
                    continue;
                }
                self.arm_tap(false)?;
                return Ok(Pass { used, more: false });
            };
            rechecked = false;
            let head = chain.head_index();
            let descs = collect_chain(chain, mem)?;
            if descs.iter().any(|d| !d.write_only) {
                return Err(NetError::Direction { queue: RX, head });
            }
            let cap: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
            // Read frames until one fits this chain (too-large ones are dropped).
            let len = loop {
                if budget == 0 {
                    self.queues[RX].go_to_previous_position();
                    return Ok(Pass { used, more: true });
                }
                match self.tap.read_frame(&mut self.buf) {
                    Ok(n) if n < VNET_HDR_LEN => budget -= 1,
                    Ok(n) if n as u64 > cap => {
                        budget -= 1;
                        self.warn_once(&format_args!(
                            "dropped an RX frame of {n} bytes for a {cap}-byte buffer"
                        ));
                    }
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.queues[RX].go_to_previous_position();
                        if e.kind() != io::ErrorKind::WouldBlock {
                            // The TAP is gone or broken: wait for the next RX notification.
                            self.warn_once(&format_args!("TAP read: {e}"));
                            self.arm_tap(false)?;
                        }
                        return Ok(Pass { used, more: false });
                    }
                }
            };
            budget -= 1;
            // One buffer per frame (no MRG_RXBUF): num_buffers is 1. The TAP skips the field.
            self.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let mut at = 0usize;
            for d in &descs {
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
            self.queues[RX].add_used(mem, head, len as u32)?;
            used = true;
        }
    }
}

/// Checks a transmitted header asks only for offloads the driver negotiated.
fn check_tx_header(hdr: &[u8], features: u64) -> Result<(), String> {
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

#[cfg(test)]
pub(super) fn test_check_tx_header(hdr: &[u8], features: u64) -> Result<(), String> {
    check_tx_header(hdr, features)
}
