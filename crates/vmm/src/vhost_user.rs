//! Connecting the VM's vhost-user devices: each backend is connected and negotiated before the
//! guest starts (or the hotplug request answers), so a socket nobody listens on, or a backend
//! that cannot serve what was asked, is one line and no VM.

use std::sync::Arc;

use hyperpool_devices::vhost_user::frontend::{Kind, Spec, VhostUserDevice};
use hyperpool_devices::virtio::net::device::random_mac;
use hyperpool_devices::virtio::{CounterSet, VirtioDevice};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::{DiskConfig, NetConfig, VhostUserConfig};
use crate::error::{Error, Result};

/// A device ready to plug, and its counters for `vm.counters`.
pub(crate) type Opened = (Box<dyn VirtioDevice>, Arc<dyn CounterSet>);

fn connect(option: &str, kind: Kind, vu: &VhostUserConfig, num_queues: u16) -> Result<Opened> {
    let dev = VhostUserDevice::connect(Spec {
        kind,
        socket: vu.socket.clone(),
        num_queues,
        queue_size: vu.queue_size,
    })
    .map_err(|e| Error::Config(format!("{option}: {e}")))?;
    let counters = dev.counters();
    Ok((Box::new(dev), counters))
}

pub(crate) fn open_disk(d: &DiskConfig, vu: &VhostUserConfig) -> Result<Opened> {
    connect("--disk", Kind::Block, vu, d.num_queues)
}

pub(crate) fn open_net(n: &NetConfig, vu: &VhostUserConfig) -> Result<Opened> {
    let mac = match n.mac {
        Some(m) => m,
        None => random_mac().map_err(Error::io("drawing a MAC address"))?,
    };
    connect("--net", Kind::Net { mac }, vu, n.num_queues)
}

/// Whether every region of `memory` can be handed to a backend (memfd-backed).
pub(crate) fn memory_is_shared(memory: &GuestMemoryMmap) -> bool {
    memory.iter().all(|r| r.file_offset().is_some())
}
