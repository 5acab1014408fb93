//! The control virtqueue (`VIRTIO_NET_F_CTRL_VQ`) and which queue pairs are in use.
//!
//! The only command class offered is multiqueue: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` picks how
//! many pairs the driver uses (1 until it says otherwise, virtio 1.2 §5.1.6.5.5). Every other
//! command is answered `VIRTIO_NET_ERR`, as the features that would enable them (RX mode, MAC
//! filters, VLANs, announce, offload changes) are not offered.
//!
//! [`Steering`] makes a pair count real: the TAP queues of pairs beyond it are detached, so the
//! kernel steers no frame to a queue whose RX ring the driver no longer fills, and each pair
//! thread is told to re-check whether it should poll its TAP queue.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::pair::NetError;
use super::tap::Tap;
use crate::virtio::chain::{ChainError, Desc, collect_chain};
use crate::virtio::interrupt::DeviceInterrupt;

/// `virtio_net_ctrl_hdr` classes and commands, and the ack values.
pub const CLASS_MQ: u8 = 4;
pub const MQ_VQ_PAIRS_SET: u8 = 0;
pub const OK: u8 = 0;
pub const ERR: u8 = 1;
/// Enough of a command to parse any we know (class, command, a `u16` argument).
const MAX_COMMAND: usize = 16;

/// Which pairs are in use, shared by the control queue (which changes it) and the pair threads
/// (which follow it).
pub(super) struct Steering {
    active: AtomicUsize,
    /// One per pair: written after every change, so the pair thread re-checks.
    wake: Vec<EventFd>,
}

impl Steering {
    /// `pairs` pairs, of which the first is in use.
    pub(super) fn new(pairs: usize) -> io::Result<Self> {
        Ok(Self {
            active: AtomicUsize::new(1),
            wake: (0..pairs)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<io::Result<_>>()?,
        })
    }

    pub(super) fn is_active(&self, pair: usize) -> bool {
        pair < self.active.load(Ordering::SeqCst)
    }

    pub(super) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// The eventfd pair `pair`'s thread waits on for changes.
    pub(super) fn wake_fd(&self, pair: usize) -> io::Result<EventFd> {
        self.wake
            .get(pair)
            .ok_or_else(|| io::Error::other(format!("no pair {pair}")))?
            .try_clone()
    }

    /// Uses the first `n` pairs: attaches their TAP queues, detaches the others (all of
    /// `taps`, also those beyond the pairs the driver set up), then wakes every pair thread.
    pub(super) fn apply(&self, n: usize, taps: &[Tap]) -> io::Result<()> {
        // Attach before detaching, so the interface never has fewer queues than either count.
        for (i, tap) in taps.iter().enumerate().take(n) {
            tap.set_queue_enabled(true)
                .map_err(|e| io::Error::new(e.kind(), format!("TAP queue {i}: attach: {e}")))?;
        }
        for (i, tap) in taps.iter().enumerate().skip(n) {
            tap.set_queue_enabled(false)
                .map_err(|e| io::Error::new(e.kind(), format!("TAP queue {i}: detach: {e}")))?;
        }
        self.active.store(n, Ordering::SeqCst);
        for w in &self.wake {
            w.write(1)?;
        }
        Ok(())
    }
}

/// The control queue, served on pair 0's thread.
pub(super) struct Ctrl {
    queue: Queue,
    event: EventFd,
    /// Its index in the device (for the interrupt's vector).
    index: usize,
    /// Pairs the driver set up both queues of: the most `VQ_PAIRS_SET` may ask for.
    usable: usize,
    /// `VIRTIO_NET_F_MQ` was negotiated.
    mq: bool,
    /// Every TAP queue of the device (clones), for steering.
    taps: Vec<Tap>,
    steering: std::sync::Arc<Steering>,
}

impl Ctrl {
    pub(super) fn new(
        queue: Queue,
        event: EventFd,
        index: usize,
        usable: usize,
        mq: bool,
        taps: Vec<Tap>,
        steering: std::sync::Arc<Steering>,
    ) -> Self {
        Self {
            queue,
            event,
            index,
            usable,
            mq,
            taps,
            steering,
        }
    }

    pub(super) fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Answers every command the driver posted.
    pub(super) fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &DeviceInterrupt,
    ) -> Result<(), NetError> {
        let _ = self.event.read();
        let mut used = false;
        loop {
            self.queue.disable_notification(mem)?;
            let avail = self.queue.avail_idx(mem, Ordering::Acquire)?.0;
            let next = self.queue.next_avail();
            if avail.wrapping_sub(next) > self.queue.size() {
                return Err(ChainError::AvailIndex { avail, next }.into());
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let descs = collect_chain(chain, mem)?;
                let (command, ack) = split_command(mem, &descs).ok_or(NetError::Direction {
                    queue: "control",
                    head,
                })?;
                let status = self.execute(&command);
                mem.write_obj(status, ack.addr)
                    .map_err(|_| ChainError::BadBuffer {
                        addr: ack.addr.0,
                        len: ack.len,
                    })?;
                self.queue.add_used(mem, head, 1)?;
                used = true;
            }
            if !self.queue.enable_notification(mem)? {
                break;
            }
        }
        if used && self.queue.needs_notification(mem)? {
            if let Err(e) = interrupt.signal_queue(self.index) {
                tracing::warn!("virtio-net: control queue interrupt: {e}");
            }
        }
        Ok(())
    }

    /// One command's answer.
    fn execute(&mut self, command: &[u8]) -> u8 {
        match *command {
            [CLASS_MQ, MQ_VQ_PAIRS_SET, lo, hi, ..] if self.mq => {
                let n = usize::from(u16::from_le_bytes([lo, hi]));
                if n == 0 || n > self.usable {
                    tracing::debug!("virtio-net: VQ_PAIRS_SET {n} refused (1..={})", self.usable);
                    return ERR;
                }
                if n == self.steering.active() {
                    return OK;
                }
                match self.steering.apply(n, &self.taps) {
                    Ok(()) => {
                        tracing::debug!("virtio-net: {n} queue pairs in use");
                        OK
                    }
                    Err(e) => {
                        tracing::warn!("virtio-net: using {n} queue pairs: {e}");
                        // Back to what every driver can live with.
                        if let Err(e) = self.steering.apply(1, &self.taps) {
                            tracing::warn!("virtio-net: back to one queue pair: {e}");
                        }
                        ERR
                    }
                }
            }
            _ => ERR,
        }
    }
}

/// A command chain: device-readable buffers (the class, command and data, of which the first
/// [`MAX_COMMAND`] bytes are read), then device-writable ones, the first byte of which takes the
/// ack. `None` if the chain is not shaped so.
fn split_command(mem: &GuestMemoryMmap, descs: &[Desc]) -> Option<(Vec<u8>, Desc)> {
    let readable = descs.iter().take_while(|d| !d.write_only).count();
    let (out, ins) = descs.split_at(readable);
    let ack = *ins.iter().find(|d| d.len > 0)?;
    if ins.iter().any(|d| !d.write_only) {
        return None;
    }
    let mut command = Vec::with_capacity(MAX_COMMAND);
    for d in out {
        let n = (d.len as usize).min(MAX_COMMAND - command.len());
        let start = command.len();
        command.resize(start + n, 0);
        mem.read_slice(&mut command[start..], d.addr).ok()?;
        if command.len() == MAX_COMMAND {
            break;
        }
    }
    Some((command, ack))
}
