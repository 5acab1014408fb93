//! The thread that watches a vhost-user device's socket for the whole life of the device: when
//! the backend hangs up (dies), the connection is dropped, the log says so once, and an active
//! device is marked `DEVICE_NEEDS_RESET`; the VM runs on. The thread then tries the socket again
//! every [`RECONNECT_EVERY`] and, once a backend answers, hands it the whole state again if the
//! driver has the device running: features, memory table, the old backend's in-flight record
//! (`INFLIGHT_SHMFD`: the requests it had taken and not completed, which the new one serves
//! first) and each ring resuming at the used index in guest memory. Without such a record the
//! rings are not resumed (see [`Thread::reconnect`]): the device stays `DEVICE_NEEDS_RESET`
//! and the driver's reset starts it afresh on the new backend.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::Shared;
use super::link::Link;

const RECONNECT_EVERY: Duration = Duration::from_millis(200);
const KILL: u64 = 0;
const SOCKET: u64 = 1;

/// The running watcher; dropping it stops and joins the thread.
pub(super) struct Watcher {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

struct Thread {
    shared: Arc<Shared>,
    epoll: Epoll,
    /// The socket registered with epoll (none while disconnected).
    watched: Option<i32>,
}

impl Watcher {
    pub(super) fn spawn(shared: Arc<Shared>) -> io::Result<Self> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL),
        )?;
        let mut thread = Thread {
            shared,
            epoll,
            watched: None,
        };
        let socket = thread.shared.lock_link().as_ref().map(Link::socket_fd);
        if let Some(fd) = socket {
            thread.watch(fd)?;
        }
        let name = format!("vhost-user-{}-watch", thread.shared.name);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || thread.run())?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.kill.write(1);
            if handle.join().is_err() {
                tracing::error!("vhost-user watcher thread panicked");
            }
        }
    }
}

impl Thread {
    fn watch(&mut self, fd: i32) -> io::Result<()> {
        // Only the hang-up: the backend's replies make the socket readable too, and they
        // belong to whoever sent the request.
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, SOCKET),
        )?;
        self.watched = Some(fd);
        Ok(())
    }

    fn run(mut self) {
        let mut ready = [EpollEvent::default(); 2];
        loop {
            let timeout = match self.watched {
                Some(_) => -1,
                None => RECONNECT_EVERY.as_millis() as i32,
            };
            let n = match self.epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vhost-user {}: epoll_wait: {e}", self.shared.name);
                    return;
                }
            };
            if n == 0 {
                self.reconnect();
            }
            for ev in &ready[..n] {
                match ev.data() {
                    KILL => return,
                    _ => self.lost(),
                }
            }
        }
    }

    /// The backend is gone: forget the connection, and tell the driver if it uses the device.
    fn lost(&mut self) {
        let mut link = self.shared.lock_link();
        if let Some(fd) = self.watched.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        link.take();
        self.shared
            .counters
            .connected
            .store(false, Ordering::SeqCst);
        self.shared.counters.disconnects.inc();
        let why = "the backend hung up";
        tracing::warn!(
            "vhost-user {} ({}): {why}; reconnecting in the background",
            self.shared.name,
            self.shared.spec.socket.display()
        );
        if let Some(session) = self.shared.session() {
            session.interrupt.set_needs_reset(&why);
        }
    }

    /// Tries the socket once; on success the backend gets the running rings.
    fn reconnect(&mut self) {
        let Ok(mut new) = Link::connect(&self.shared.spec) else {
            return;
        };
        let shared = self.shared.clone();
        let mut link = shared.lock_link();
        let mut resumed = false;
        if let Some(s) = shared.session() {
            let mem = s.mem.memory();
            let spec = &shared.spec;
            let mut inflight = s.lock_inflight();
            let served = s.served.load(Ordering::SeqCst);
            if served && inflight.is_none() {
                // Which requests the dead backend had taken is unknown: the used index says how
                // many completed, not which (backends complete out of order). Serving from it
                // would run some twice and never others; the driver's reset starts clean.
                tracing::warn!(
                    "vhost-user {}: the backend keeps no in-flight record (INFLIGHT_SHMFD); the rings wait for the driver to reset the device",
                    shared.name
                );
            } else {
                let started = s
                    .rings
                    .iter()
                    .map(|r| r.used_idx(&mem))
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(|bases| match inflight.as_ref() {
                        // The successor takes over the record and serves what it lists first.
                        Some(record) => new.start(
                            &mem,
                            s.acked,
                            spec.queue_size,
                            &s.rings,
                            &bases,
                            Some(record),
                        ),
                        // No backend had these rings: nothing is in flight, and this
                        // backend's record starts now.
                        // Kept only once the rings run: a backend that fails to start must
                        // not hand its record to the next one.
                        None => {
                            let record = new.inflight(spec.num_queues, spec.queue_size)?;
                            new.start(&mem, s.acked, spec.queue_size, &s.rings, &bases, None)?;
                            *inflight = record;
                            Ok(())
                        }
                    });
                if let Err(e) = started {
                    tracing::warn!("vhost-user {}: reconnecting: {e}", self.shared.name);
                    return;
                }
                s.served.store(true, Ordering::SeqCst);
                resumed = true;
            }
        }
        if let Err(e) = self.watch(new.socket_fd()) {
            tracing::warn!("vhost-user {}: watching the socket: {e}", self.shared.name);
            return;
        }
        *link = Some(new);
        self.shared.counters.connected.store(true, Ordering::SeqCst);
        self.shared.counters.reconnects.inc();
        tracing::info!(
            "vhost-user {} ({}): reconnected{}",
            self.shared.name,
            self.shared.spec.socket.display(),
            if resumed { "; rings resumed" } else { "" }
        );
    }
}
