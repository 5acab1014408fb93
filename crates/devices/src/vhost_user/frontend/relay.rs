//! The thread of an active vhost-user device: it turns the backend's "used buffers" eventfds
//! into the guest's interrupts, watches the socket for the backend's death, and reconnects.
//!
//! Interrupts go through [`DeviceInterrupt::signal_queue`] rather than handing the backend the
//! MSI-X vector's irqfd: the vector a queue uses, its mask bit and MSI-X's enable bit can all
//! change while the device runs, and INTx needs the ISR set; the transport's sink already
//! handles each case, and a direct irqfd would bypass it. The cost is one thread wake-up per
//! interrupt (guest notifications still go straight to the backend on the ioeventfd).
//!
//! When the socket hangs up the device is marked `DEVICE_NEEDS_RESET` (logged once); the thread
//! then tries the socket again every [`RECONNECT_EVERY`] and, once a backend answers, hands it
//! the whole state again: features, memory table, and each ring resuming at the used index in
//! guest memory.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Session, Shared};
use super::link::Link;

const RECONNECT_EVERY: Duration = Duration::from_millis(200);
const KILL: u64 = u64::MAX;
const SOCKET: u64 = u64::MAX - 1;

/// A running relay thread; dropping it stops and joins the thread.
pub(super) struct Relay {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

struct Thread {
    shared: Arc<Shared>,
    session: Arc<Session>,
    epoll: Epoll,
    /// The socket registered with epoll (none while disconnected).
    watched: Option<i32>,
}

impl Relay {
    pub(super) fn spawn(shared: Arc<Shared>, session: Arc<Session>) -> io::Result<Self> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL),
        )?;
        for (token, ring) in session.rings.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                ring.call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token as u64),
            )?;
        }
        let mut thread = Thread {
            shared,
            session,
            epoll,
            watched: None,
        };
        let socket = thread.shared.lock_link().as_ref().map(Link::socket_fd);
        match socket {
            Some(fd) => thread.watch(fd)?,
            None => thread.lost("the backend is not connected"),
        }
        let name = format!("vhost-user-{}", thread.shared.name);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || thread.run())?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }

    fn shutdown(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.kill.write(1);
            if handle.join().is_err() {
                tracing::error!("vhost-user relay thread panicked");
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
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
        let mut ready = vec![EpollEvent::default(); self.session.rings.len() + 2];
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
                    SOCKET => self.lost("the backend hung up"),
                    token => {
                        let Some(ring) = self.session.rings.get(token as usize) else {
                            continue;
                        };
                        // Drained first: a call that races with the interrupt wakes us again.
                        let _ = ring.call.read();
                        self.shared.counters.interrupts.inc();
                        if let Err(e) = self.session.interrupt.signal_queue(ring.index) {
                            tracing::warn!("vhost-user {}: interrupt: {e}", self.shared.name);
                        }
                    }
                }
            }
        }
    }

    /// The backend is gone: forget the connection and tell the driver.
    fn lost(&mut self, why: &str) {
        if let Some(fd) = self.watched.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.shared.lock_link().take();
        self.shared
            .counters
            .connected
            .store(false, Ordering::SeqCst);
        self.shared.counters.disconnects.inc();
        tracing::warn!(
            "vhost-user {} ({}): {why}; the device needs a reset, reconnecting in the background",
            self.shared.name,
            self.shared.spec.socket.display()
        );
        self.session.interrupt.set_needs_reset(&why);
    }

    /// Tries the socket once; on success the backend gets the whole state again.
    fn reconnect(&mut self) {
        let Ok(mut link) = Link::connect(&self.shared.spec) else {
            return;
        };
        let s = &self.session;
        let mem = s.mem.memory();
        let started = s
            .rings
            .iter()
            .map(|r| r.used_idx(&mem))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|bases| {
                link.start(&mem, s.acked, self.shared.spec.queue_size, &s.rings, &bases)
            });
        if let Err(e) = started {
            tracing::warn!("vhost-user {}: reconnecting: {e}", self.shared.name);
            return;
        }
        let fd = link.socket_fd();
        *self.shared.lock_link() = Some(link);
        if let Err(e) = self.watch(fd) {
            tracing::warn!("vhost-user {}: watching the socket: {e}", self.shared.name);
        }
        self.shared.counters.connected.store(true, Ordering::SeqCst);
        self.shared.counters.reconnects.inc();
        tracing::info!(
            "vhost-user {} ({}): reconnected; rings resumed",
            self.shared.name,
            self.shared.spec.socket.display()
        );
    }
}
