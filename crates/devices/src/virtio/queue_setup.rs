//! A virtqueue from what a driver configured (size and ring addresses), checked against guest
//! memory: shared by the virtio-pci transport and the vhost-user backend, which receive the
//! same settings by different routes.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Where a split virtqueue's three rings are in guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A ready queue of `size` entries (at most `max_size`) on `addrs`, or why it cannot be one:
/// a size that is not a power of two within the maximum, misaligned rings, or rings outside
/// `mem`.
pub fn configured_queue(
    max_size: u16,
    size: u16,
    addrs: RingAddrs,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Queue, String> {
    let mut q = Queue::new(max_size).map_err(|e| e.to_string())?;
    q.try_set_size(size)
        .map_err(|_| format!("size {size} is not a power of two <= {max_size}"))?;
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
    Ok(q)
}
