//! How a device's interrupts reach a vhost-user frontend: queue `i`'s vector is `i` and writes
//! that ring's call eventfd; the configuration vector only fires when a device marks itself
//! broken (`DEVICE_NEEDS_RESET`: our devices have no other config changes), which writes every
//! ring's error eventfd so the frontend learns the device needs a reset.

use std::io;
use std::sync::{Arc, RwLock};

use vmm_sys_util::eventfd::EventFd;

use crate::virtio::VirtioInterrupt;

/// The eventfds the frontend gave for each ring, shared between the request handler (which
/// replaces them) and the device threads (which signal them).
#[derive(Default)]
pub struct RingFds {
    call: Vec<Option<EventFd>>,
    err: Vec<Option<EventFd>>,
}

pub type SharedRingFds = Arc<RwLock<RingFds>>;

impl RingFds {
    pub fn new(rings: usize) -> SharedRingFds {
        Arc::new(RwLock::new(Self {
            call: (0..rings).map(|_| None).collect(),
            err: (0..rings).map(|_| None).collect(),
        }))
    }

    pub fn set_call(&mut self, ring: usize, fd: Option<EventFd>) {
        if let Some(slot) = self.call.get_mut(ring) {
            *slot = fd;
        }
    }

    pub fn set_err(&mut self, ring: usize, fd: Option<EventFd>) {
        if let Some(slot) = self.err.get_mut(ring) {
            *slot = fd;
        }
    }

    /// Tells the frontend the device is broken: every ring's error eventfd.
    pub fn signal_err(&self) -> io::Result<()> {
        for fd in self.err.iter().flatten() {
            fd.write(1)?;
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.call.iter_mut().for_each(|f| *f = None);
        self.err.iter_mut().for_each(|f| *f = None);
    }
}

/// The [`VirtioInterrupt`] sink of a device served over vhost-user.
pub struct CallSink {
    fds: SharedRingFds,
    config_vector: u16,
}

impl CallSink {
    /// Queue `i` uses vector `i`; configuration changes use `config_vector` (= the ring count).
    pub fn new(fds: SharedRingFds, config_vector: u16) -> Self {
        Self { fds, config_vector }
    }
}

impl VirtioInterrupt for CallSink {
    fn trigger(&self, vector: u16) -> io::Result<()> {
        let fds = self.fds.read().unwrap_or_else(|e| e.into_inner());
        if vector == self.config_vector {
            return fds.signal_err();
        }
        // A ring without a call fd is polled by its frontend (or not set up yet).
        match fds.call.get(usize::from(vector)) {
            Some(Some(fd)) => fd.write(1),
            _ => Ok(()),
        }
    }
}
