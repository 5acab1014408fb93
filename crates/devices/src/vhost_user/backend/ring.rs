//! One vring as the frontend configured it: size, addresses (already guest addresses), the
//! index to start from, the kick eventfd and whether it is enabled.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::ActivatedQueue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

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
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|_| {
            format!(
                "size {} is not a power of two <= {}",
                self.size, self.max_size
            )
        })?;
        q.try_set_desc_table_address(GuestAddress(addrs.desc))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(addrs.avail)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(addrs.used)))
            .map_err(|e| e.to_string())?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(format!(
                "rings desc={:#x} avail={:#x} used={:#x} are outside guest memory",
                addrs.desc, addrs.avail, addrs.used
            ));
        }
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
