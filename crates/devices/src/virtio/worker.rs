//! The thread a virtio device serves its queues on: it sleeps in epoll on the queue eventfds
//! (written by KVM's ioeventfd, or by the transport's notify region) and calls the device's
//! handler with the index of the queue that was notified.

use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// How much of a queue one serving call got through.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Everything available; notifications are on again.
    All,
    /// A queue's worth of chains; more may be waiting and notifications are still off.
    Batch,
}

/// The worker's next step after serving a queue. After a batch the queue's own eventfd `kick`
/// is signalled so the thread goes back to epoll first — where a reset's kill event may be
/// waiting — before it serves the rest; an error marks the device broken and stops the thread.
pub fn after_serving<E: std::fmt::Display>(
    served: Result<Served, E>,
    kick: &EventFd,
    interrupt: &super::DeviceInterrupt,
) -> Next {
    match served {
        Ok(Served::All) => Next::Continue,
        Ok(Served::Batch) => match kick.write(1) {
            Ok(()) => Next::Continue,
            Err(e) => {
                interrupt.set_needs_reset(&format!("re-arming the queue: {e}"));
                Next::Stop
            }
        },
        Err(e) => {
            interrupt.set_needs_reset(&e);
            Next::Stop
        }
    }
}

/// What the handler wants after serving a notification.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Stop serving (e.g. the device is broken); the thread exits.
    Stop,
}

/// A running device thread. Dropping it (or [`QueueWorker::stop`]) stops and joins the thread.
pub struct QueueWorker {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl QueueWorker {
    /// Spawns thread `name` that waits on `events` (`(token, eventfd)`) and calls
    /// `handler(token)` after draining that eventfd. A token is usually a queue index; devices
    /// with other eventfds (virtio-blk's io_uring completions) give those tokens of their own.
    pub fn spawn<F>(name: String, events: Vec<(usize, EventFd)>, mut handler: F) -> io::Result<Self>
    where
        F: FnMut(usize) -> Next + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let kill_token = u64::MAX;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, kill_token),
        )?;
        for (token, (_, evt)) in events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token as u64),
            )?;
        }
        let kill_evt = kill.try_clone()?;
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let mut ready = vec![EpollEvent::default(); events.len() + 1];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio worker: epoll_wait: {e}");
                        return;
                    }
                };
                for ev in &ready[..n] {
                    let token = ev.data();
                    if token == kill_token {
                        let _ = kill_evt.read();
                        return;
                    }
                    let Some((queue, evt)) = events.get(token as usize) else {
                        continue;
                    };
                    // Drain the counter first so a notification that races with the work below
                    // wakes us again.
                    let _ = evt.read();
                    if handler(*queue) == Next::Stop {
                        return;
                    }
                }
            }
        })?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it to exit.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.kill.write(1);
            if handle.join().is_err() {
                tracing::error!("virtio worker thread panicked");
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}
