//! One vring as the frontend configured it: size, addresses (already guest addresses), the
//! index to start from, the kick eventfd and whether it is enabled.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::ActivatedQueue;
use crate::virtio::queue_setup::configured_queue;

pub use crate::virtio::queue_setup::RingAddrs;

pub struct Ring {
    pub max_size: u16,
    pub size: u16,
    pub addrs: Option<RingAddrs>,
    /// The next available index to process (SET_VRING_BASE, then kept across device restarts).
    pub base: u16,
    /// Set by SET_VRING_KICK: the ring is started. GET_VRING_BASE stops it again.
    pub kick: Option<EventFd>,
    /// SET_VRING_ENABLE. The spec has rings start disabled once PROTOCOL_FEATURES is
    /// negotiated, but QEMU's vhost-user net sends its enables before it sets features (the
    /// vhost crate refuses them then) and never again: so rings start enabled, as they do in
    /// libvhost-user and DPDK, and an explicit disable stops one.
    pub enabled: bool,
}

impl Ring {
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            addrs: None,
            base: 0,
            kick: None,
            enabled: true,
        }
    }

    /// Whether the device should be running this ring.
    pub fn ready(&self) -> bool {
        self.kick.is_some() && self.enabled && self.addrs.is_some()
    }

    /// The queue for the device, starting at `base`; `None` if the configuration does not fit
    /// guest memory (checked by virtio-queue against `mem`).
    pub fn activated(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<ActivatedQueue, String> {
        let addrs = self.addrs.ok_or("no ring addresses")?;
        let kick = self.kick.as_ref().ok_or("no kick eventfd")?;
        let mut q = configured_queue(self.max_size, self.size, addrs, event_idx, mem)?;
        q.set_next_avail(self.base);
        q.set_next_used(self.base);
        let event = kick.try_clone().map_err(|e| format!("kick eventfd: {e}"))?;
        Ok(ActivatedQueue {
            index,
            queue: q,
            event,
        })
    }

    /// The used ring's index in guest memory: where the driver will resume after the device
    /// stopped, since our devices complete every chain they take before their reset returns.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> Option<u16> {
        let addrs = self.addrs?;
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_used_ring_address(GuestAddress(addrs.used)).ok()?;
        q.used_idx(mem, Ordering::Acquire).ok().map(|w| w.0)
    }
}
