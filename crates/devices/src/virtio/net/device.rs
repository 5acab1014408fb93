//! The virtio-net device (id 1): N queue pairs (receiveqK = 2K, transmitqK = 2K + 1) on N TAP
//! queues, a control queue when N > 1, the MAC, link status and `max_virtqueue_pairs` in its
//! configuration, and a thread per pair ([`super::pair`]).
//!
//! Frames carry `virtio_net_hdr_v1` (12 bytes) in front, exactly as the TAP reads and writes
//! them (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12), so checksum and TSO offloads pass through: the
//! driver's `GUEST_*` choices become the TAP's `TUNSETOFFLOAD`; its `HOST_*` ones decide which
//! transmitted headers we accept. With `MRG_RXBUF` a received frame may span several chains;
//! without it, each goes into one (a driver that takes TSO frames then posts 64 KiB chains).
//!
//! Multiqueue (`MQ` + `CTRL_VQ`, offered with more than one pair): the driver starts on pair 0
//! and moves to K pairs with `VQ_PAIRS_SET` on the control queue ([`super::ctrl`]). Its index is
//! 2N with `MQ` negotiated, else 2 (virtio 1.2 §5.1.2). A driver that does not negotiate `MQ`
//! uses pair 0 only, and the other TAP queues stay detached so every frame reaches it.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{Ctrl, Steering};
use super::pair::{PairCounters, PairQueue, PairSpec, PairThread};
use super::tap::{MAX_QUEUES, Tap, VNET_HDR_LEN, offload};
use crate::virtio::counters::Summed;
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
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const MQ: u64 = 1 << 22;
}

/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;
const DATA_QUEUE_SIZE: u16 = 256;
const CTRL_QUEUE_SIZE: u16 = 64;
/// The largest frame in either direction, header included: a 64 KiB TSO frame with an
/// Ethernet + VLAN header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 18;
/// Configuration: mac[6], status u16, max_virtqueue_pairs u16.
const CONFIG_SIZE: usize = 10;
/// The most queue pairs a device takes (one TAP queue each).
pub const MAX_PAIRS: usize = MAX_QUEUES;

/// A network device's traffic: its pairs' counts, summed.
pub type NetCounters = Summed<PairCounters>;

/// The virtio network device on a TAP.
pub struct Net {
    /// One TAP queue per pair.
    taps: Vec<Tap>,
    mac: [u8; 6],
    queue_sizes: Vec<u16>,
    workers: Vec<Worker>,
    /// One set per pair: pairs count on their own threads.
    counters: Arc<NetCounters>,
}

struct Worker {
    kill: EventFd,
    handle: JoinHandle<()>,
}

impl Net {
    /// A device with one queue pair per TAP queue in `taps` (1 to [`MAX_PAIRS`]), with `mac`,
    /// or a random locally administered unicast MAC.
    pub fn new(taps: Vec<Tap>, mac: Option<[u8; 6]>) -> io::Result<Self> {
        if taps.is_empty() || taps.len() > MAX_PAIRS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "virtio-net takes 1 to {MAX_PAIRS} queue pairs, not {}",
                    taps.len()
                ),
            ));
        }
        let mac = match mac {
            Some(m) => m,
            None => random_mac()?,
        };
        let mut queue_sizes = vec![DATA_QUEUE_SIZE; 2 * taps.len()];
        if taps.len() > 1 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        Ok(Self {
            counters: Arc::new(Summed::new(taps.len())),
            taps,
            mac,
            queue_sizes,
            workers: Vec::new(),
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What the device has carried since it was built (across driver resets), over all pairs.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub fn pairs(&self) -> usize {
        self.taps.len()
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

fn clone_taps(taps: &[Tap]) -> Result<Vec<Tap>, ActivateError> {
    taps.iter()
        .map(Tap::try_clone)
        .collect::<io::Result<_>>()
        .map_err(ActivateError::Thread)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mq = if self.taps.len() > 1 {
            feature::MQ | feature::CTRL_VQ
        } else {
            0
        };
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
            | feature::MRG_RXBUF
            | mq
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&(self.taps.len() as u16).to_le_bytes());
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
        let pairs = self.taps.len();
        let mq = pairs > 1 && features & feature::MQ != 0;
        let got = queues.len();
        let mut slots: Vec<Option<PairQueue>> = (0..self.queue_sizes.len()).map(|_| None).collect();
        for q in queues {
            if let Some(slot) = slots.get_mut(q.index) {
                *slot = Some(PairQueue {
                    queue: q.queue,
                    event: q.event,
                    index: q.index,
                });
            }
        }
        let ctrl_index = match (features & feature::CTRL_VQ != 0, mq) {
            (false, _) => None,
            (true, true) => Some(2 * pairs),
            (true, false) => Some(2),
        };
        let ctrl_queue = ctrl_index.and_then(|i| slots.get_mut(i)?.take());
        // Pairs with both queues set up, from pair 0 on (without MQ only pair 0 counts).
        let mut data: Vec<(PairQueue, PairQueue)> = Vec::new();
        let limit = if mq { pairs } else { 1 };
        for k in 0..limit {
            let (Some(rx), Some(tx)) = (slots[2 * k].take(), slots[2 * k + 1].take()) else {
                break;
            };
            data.push((rx, tx));
        }
        if data.is_empty() {
            return Err(ActivateError::QueueCount { expected: 2, got });
        }
        self.taps[0]
            .set_offload(tap_offload(features))
            .map_err(|e| {
                ActivateError::Other(format!("TAP {}: TUNSETOFFLOAD: {e}", self.taps[0].name()))
            })?;
        let steering = Arc::new(Steering::new(data.len()).map_err(ActivateError::Thread)?);
        // Pair 0 only, until the driver asks for more; idle TAP queues detached.
        steering
            .apply(1, &self.taps)
            .map_err(|e| ActivateError::Other(format!("TAP {}: {e}", self.taps[0].name())))?;
        let mut ctrl = match ctrl_queue {
            Some(pq) => Some(Ctrl::new(
                pq.queue,
                pq.event,
                pq.index,
                data.len(),
                mq,
                clone_taps(&self.taps)?,
                steering.clone(),
            )),
            None => None,
        };
        let usable = data.len();
        for (pair, (rx, tx)) in data.into_iter().enumerate() {
            let counters = self.counters.part(pair).cloned().ok_or_else(|| {
                ActivateError::Other(format!("no counters for queue pair {pair}"))
            })?;
            let spec = PairSpec {
                pair,
                tap: self.taps[pair].try_clone().map_err(ActivateError::Thread)?,
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                features,
                rx,
                tx,
                steering: steering.clone(),
                ctrl: ctrl.take(),
                kill: EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Thread)?,
                counters,
            };
            let (thread, kill) = PairThread::new(spec).map_err(ActivateError::Thread)?;
            let name = if usable > 1 {
                format!("virtio-net-{pair}")
            } else {
                "virtio-net".into()
            };
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || thread.run())
                .map_err(ActivateError::Thread)?;
            self.workers.push(Worker { kill, handle });
        }
        Ok(())
    }

    fn reset(&mut self) {
        for w in self.workers.drain(..) {
            let _ = w.kill.write(1);
            if w.handle.join().is_err() {
                tracing::error!("virtio-net thread panicked");
            }
        }
    }
}

#[cfg(test)]
pub(super) fn test_check_tx_header(hdr: &[u8], features: u64) -> Result<(), String> {
    super::pair::check_tx_header(hdr, features)
}
