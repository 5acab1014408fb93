//! [`VhostUserDevice`]: a virtio device whose queues another process serves. The VMM keeps the
//! transport (feature negotiation, status, queue registers, MSI-X) and the configuration space
//! the backend gave it at connection time; on `DRIVER_OK` it hands the backend the rings.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::link::{Inflight, Link, Ring};
use super::spec::Spec;
use super::watch::Watcher;
use crate::virtio::counters::Counter;
use crate::virtio::worker::QueueWorker;
use crate::virtio::{
    ActivateError, ActivatedQueue, CounterSet, DeviceInterrupt, GuestMemoryHandle, MAX_QUEUE_SIZE,
    VirtioDevice,
};

/// What the frontend did for a device (the I/O itself is the backend's to count).
#[derive(Debug, Default)]
pub struct VhostUserCounters {
    /// Interrupts relayed from the backend to the guest.
    pub interrupts: Counter,
    /// Times the backend hung up.
    pub disconnects: Counter,
    /// Times a backend was connected again and given the running rings.
    pub reconnects: Counter,
    /// Whether a backend is connected now.
    pub connected: AtomicBool,
}

impl CounterSet for VhostUserCounters {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("interrupts", self.interrupts.get()),
            ("disconnects", self.disconnects.get()),
            ("reconnects", self.reconnects.get()),
            (
                "connected",
                u64::from(self.connected.load(Ordering::SeqCst)),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// What the device and its watcher thread share.
pub(super) struct Shared {
    pub spec: Spec,
    /// For the log: `blk` or `net`.
    pub name: String,
    /// `None` while the backend is gone. Locked before `session`.
    link: Mutex<Option<Link>>,
    /// What the driver has running, if it does.
    session: Mutex<Option<Arc<Session>>>,
    pub counters: Arc<VhostUserCounters>,
}

impl Shared {
    pub fn lock_link(&self) -> MutexGuard<'_, Option<Link>> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn session(&self) -> Option<Arc<Session>> {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_session(&self, session: Option<Arc<Session>>) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = session;
    }
}

/// One activation: the rings the backend serves and what reaches the guest.
pub(super) struct Session {
    pub rings: Vec<Ring>,
    pub acked: u64,
    pub mem: GuestMemoryHandle,
    pub interrupt: DeviceInterrupt,
    /// The backend's in-flight record for these rings, handed to its successor.
    pub inflight: Mutex<Option<Inflight>>,
    /// Whether a backend has had the rings (so requests may be in flight).
    pub served: AtomicBool,
}

impl Session {
    pub fn lock_inflight(&self) -> MutexGuard<'_, Option<Inflight>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    /// The relay of the running session (stopped first on reset).
    relay: Option<QueueWorker>,
    _watcher: Watcher,
    shared: Arc<Shared>,
    queue_sizes: Vec<u16>,
    offered: u64,
    config: Vec<u8>,
}

impl VhostUserDevice {
    /// Connects to the backend and learns what it serves; the error is one line.
    pub fn connect(spec: Spec) -> Result<Self, String> {
        if spec.num_queues == 0
            || !spec.queue_size.is_power_of_two()
            || spec.queue_size > MAX_QUEUE_SIZE
        {
            return Err(format!(
                "vhost-user: queue_size={} is not a power of two up to {MAX_QUEUE_SIZE}",
                spec.queue_size
            ));
        }
        let link = Link::connect(&spec)?;
        let offered = spec.offered_features(link.backend_features);
        let config = spec
            .guest_config(link.config.as_deref(), offered)
            .map_err(|e| format!("vhost-user backend at {}: {e}", spec.socket.display()))?;
        let counters = Arc::new(VhostUserCounters::default());
        counters.connected.store(true, Ordering::SeqCst);
        let name = match spec.kind {
            super::Kind::Block => "blk",
            super::Kind::Net { .. } => "net",
        };
        tracing::info!(
            "vhost-user {name}: backend at {} ({} queues of {}, features {offered:#x})",
            spec.socket.display(),
            spec.num_queues,
            spec.queue_size,
        );
        let queue_sizes = vec![spec.queue_size; usize::from(spec.num_queues)];
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            spec,
            link: Mutex::new(Some(link)),
            session: Mutex::new(None),
            counters,
        });
        let watcher = Watcher::spawn(shared.clone())
            .map_err(|e| format!("vhost-user: cannot start the socket watcher: {e}"))?;
        Ok(Self {
            relay: None,
            _watcher: watcher,
            shared,
            queue_sizes,
            offered,
            config,
        })
    }

    pub fn counters(&self) -> Arc<VhostUserCounters> {
        self.shared.counters.clone()
    }

    fn start(
        &mut self,
        mem: GuestMemoryHandle,
        features: u64,
        queues: Vec<ActivatedQueue>,
        interrupt: DeviceInterrupt,
    ) -> Result<(), String> {
        let bases: Vec<u16> = queues.iter().map(|q| q.queue.next_avail()).collect();
        let rings = queues
            .into_iter()
            .map(|q| {
                Ok(Ring {
                    index: q.index,
                    size: q.queue.size(),
                    desc: q.queue.desc_table(),
                    avail: q.queue.avail_ring(),
                    used: q.queue.used_ring(),
                    kick: q.event,
                    call: EventFd::new(libc::EFD_NONBLOCK)
                        .map_err(|e| format!("call eventfd: {e}"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let session = Arc::new(Session {
            rings,
            acked: features,
            mem,
            interrupt,
            inflight: Mutex::new(None),
            served: AtomicBool::new(false),
        });
        {
            let mut link = self.shared.lock_link();
            match link.as_mut() {
                Some(l) => {
                    let spec = &self.shared.spec;
                    *session.lock_inflight() = l.inflight(spec.num_queues, spec.queue_size)?;
                    l.start(
                        &session.mem.memory(),
                        features,
                        spec.queue_size,
                        &session.rings,
                        &bases,
                        None,
                    )?;
                    session.served.store(true, Ordering::SeqCst);
                }
                // The watcher starts the rings when a backend is back (at the used index,
                // which for fresh rings is where the driver starts).
                None => tracing::warn!(
                    "vhost-user {}: the backend is not connected; the device waits for it",
                    self.shared.name
                ),
            }
            self.shared.set_session(Some(session.clone()));
        }
        match super::relay::spawn(&self.shared.name, &session, self.shared.counters.clone()) {
            Ok(relay) => {
                self.relay = Some(relay);
                Ok(())
            }
            Err(e) => {
                self.shared.set_session(None);
                Err(format!("cannot start the relay thread: {e}"))
            }
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.shared.spec.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn config_size(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.config.get(start..).and_then(|c| c.get(..data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let Some(dst) = self
            .config
            .get_mut(start..)
            .and_then(|c| c.get_mut(..data.len()))
        else {
            return;
        };
        dst.copy_from_slice(data);
        let mut link = self.shared.lock_link();
        if let Some(l) = link
            .as_mut()
            .filter(|l| l.has(vhost::vhost_user::VhostUserProtocolFeatures::CONFIG))
        {
            if let Err(e) = l.set_config(start as u32, data) {
                tracing::warn!("vhost-user {}: {e}", self.shared.name);
            }
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
        if queues.is_empty() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: 0,
            });
        }
        self.start(mem, features, queues, interrupt)
            .map_err(|e| ActivateError::Other(format!("vhost-user {}: {e}", self.shared.name)))
    }

    fn reset(&mut self) {
        let Some(relay) = self.relay.take() else {
            return;
        };
        relay.stop();
        let mut link = self.shared.lock_link();
        let Some(session) = self.shared.session() else {
            return;
        };
        self.shared.set_session(None);
        if let Some(l) = link.as_mut() {
            // A backend that cannot stop its rings is dead or broken: the watcher sees a
            // hang-up, and a live one gets a fresh start at the next activation.
            if let Err(e) = l.stop(&session.rings) {
                tracing::warn!("vhost-user {}: stopping the rings: {e}", self.shared.name);
            }
        }
    }
}
