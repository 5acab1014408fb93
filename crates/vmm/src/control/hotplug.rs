//! `vm.add-disk`, `vm.add-net` and `vm.remove-device` on a running (or paused) VM: the API side
//! of hotplug. The request is checked and the device opened before anything changes, so bad
//! input (a missing or locked image, a TAP that cannot be opened, a duplicate id) is one 4xx and
//! nothing is half-added; the device is then plugged in (`crate::hotplug`) and the VM's
//! configuration updated, as `vm.info` shows. A removal only asks the guest; the device leaves
//! the configuration when the guest ejects it ([`Event::Ejected`](super::Event::Ejected)).

use hyperpool_api as api;
use hyperpool_devices::virtio::{CounterSet, VirtioDevice};
use std::sync::Arc;

use super::{ActionError, Controller, Defined, Reply};
use crate::config::VmConfig;
use crate::hotplug::{Kind, bdf};

type Reply_ = std::result::Result<Reply, ActionError>;

impl Controller {
    pub(super) fn hot_add_disk(&mut self, mut disk: api::DiskConfig) -> Reply_ {
        let id = self.new_device_id(disk.id.take(), Kind::Disk)?;
        disk.id = Some(id.clone());
        let (api, cfg) = self.checked_edit(|c| c.disks.get_or_insert_default().push(disk))?;
        let Some(disk_cfg) = cfg.disks.last() else {
            return Err(ActionError::new(500, "the added disk is missing"));
        };
        self.need_free_slot()?;
        let disk_cfg = &if cfg.device_processes {
            crate::device_processes::disk(disk_cfg).map_err(|e| user_error(&e.to_string()))?
        } else {
            disk_cfg.clone()
        };
        self.need_shared_memory(disk_cfg.vhost_user.is_some())?;
        let (block, counters) =
            crate::disk::open(disk_cfg).map_err(|e| user_error(&e.to_string()))?;
        self.plug(Kind::Disk, id, block, counters, api, cfg)
    }

    pub(super) fn hot_add_net(&mut self, mut net: api::NetConfig) -> Reply_ {
        let id = self.new_device_id(net.id.take(), Kind::Net)?;
        net.id = Some(id.clone());
        let (api, cfg) = self.checked_edit(|c| c.net.get_or_insert_default().push(net))?;
        let Some(net_cfg) = cfg.nets.last() else {
            return Err(ActionError::new(500, "the added network device is missing"));
        };
        self.need_free_slot()?;
        let net_cfg = &if cfg.device_processes {
            crate::device_processes::net(net_cfg).map_err(|e| user_error(&e.to_string()))?
        } else {
            net_cfg.clone()
        };
        self.need_shared_memory(net_cfg.vhost_user.is_some())?;
        let (dev, counters) = crate::net::open(net_cfg).map_err(|e| user_error(&e.to_string()))?;
        self.plug(Kind::Net, id, dev, counters, api, cfg)
    }

    pub(super) fn hot_remove(&mut self, id: &str) -> Reply_ {
        let running = self.running_mut()?;
        match running.machine_mut().request_removal(id) {
            Ok(true) => Ok(Reply::Done),
            Ok(false) => Err(ActionError::new(404, format!("no device has id '{id}'"))),
            Err(e) => Err(ActionError::new(500, e.to_string())),
        }
    }

    /// The guest ejected `slots`: those devices are gone, and leave the configuration too.
    pub(super) fn ejected(&mut self, slots: u32) {
        let Ok(running) = self.running_mut() else {
            return;
        };
        let removed = running.machine_mut().ejected(slots);
        if removed.is_empty() {
            return;
        }
        let fds = self.vm.as_ref().map(|vm| {
            super::net_fds(
                vm.api
                    .net
                    .iter()
                    .flatten()
                    .filter(|n| n.id.as_ref().is_some_and(|i| removed.contains(i))),
            )
        });
        let edit = |c: &mut api::VmConfig| {
            let gone = |id: &Option<String>| id.as_ref().is_some_and(|i| removed.contains(i));
            if let Some(d) = c.disks.as_mut() {
                d.retain(|d| !gone(&d.id));
            }
            if let Some(n) = c.net.as_mut() {
                n.retain(|n| !gone(&n.id));
            }
        };
        match self.checked_edit(edit) {
            Ok((api, cfg)) => self.commit(api, cfg),
            Err(e) => tracing::error!("updating the configuration after an eject: {}", e.message),
        }
        crate::net::release(&fds.unwrap_or_default());
    }

    /// The id for a new device: the one given, if no device has it, or the first free `_disk<n>`
    /// / `_net<n>` (Cloud Hypervisor's names).
    fn new_device_id(
        &self,
        given: Option<String>,
        kind: Kind,
    ) -> std::result::Result<String, ActionError> {
        let Some(Defined { api, .. }) = &self.vm else {
            return Err(ActionError::no_vm());
        };
        let used: Vec<&String> = api
            .disks
            .iter()
            .flatten()
            .filter_map(|d| d.id.as_ref())
            .chain(api.net.iter().flatten().filter_map(|n| n.id.as_ref()))
            .collect();
        match given {
            Some(id) if id.is_empty() => {
                Err(ActionError::new(400, "field `id`: must not be empty"))
            }
            Some(id) if used.contains(&&id) => Err(ActionError::new(
                409,
                format!("a device with id '{id}' already exists"),
            )),
            Some(id) => Ok(id),
            None => {
                let prefix = match kind {
                    Kind::Disk => "_disk",
                    Kind::Net => "_net",
                };
                Ok((0..)
                    .map(|n| format!("{prefix}{n}"))
                    .find(|id| !used.contains(&id))
                    .unwrap_or_default())
            }
        }
    }

    fn need_free_slot(&mut self) -> std::result::Result<(), ActionError> {
        if self.running_mut()?.machine_mut().has_free_slot() {
            Ok(())
        } else {
            Err(ActionError::new(
                409,
                "all 31 PCI slots are taken; remove a device first",
            ))
        }
    }

    /// A vhost-user device maps guest memory, which only a VM started with shared memory has.
    fn need_shared_memory(&mut self, vhost_user: bool) -> std::result::Result<(), ActionError> {
        if !vhost_user
            || crate::vhost_user::memory_is_shared(&self.running_mut()?.machine_mut().memory)
        {
            return Ok(());
        }
        Err(ActionError::new(
            400,
            "a vhost-user device needs shared guest memory: start the VM with memory.shared = true",
        ))
    }

    fn plug(
        &mut self,
        kind: Kind,
        id: String,
        device: Box<dyn VirtioDevice>,
        counters: Arc<dyn CounterSet>,
        api: api::VmConfig,
        cfg: VmConfig,
    ) -> Reply_ {
        let machine = self.running_mut()?.machine_mut();
        let slot = machine
            .hot_add(kind, &id, device, counters)
            .map_err(|e| ActionError::new(500, e.to_string()))?;
        self.commit(api, cfg);
        Ok(Reply::PciDevice(api::PciDeviceInfo { id, bdf: bdf(slot) }))
    }

    fn running_mut(&mut self) -> std::result::Result<&mut crate::running::RunningVm, ActionError> {
        self.vm
            .as_mut()
            .and_then(|vm| vm.running.as_mut())
            .ok_or_else(ActionError::no_vm)
    }

    pub(super) fn commit(&mut self, new_api: api::VmConfig, new_cfg: VmConfig) {
        if let Some(Defined { api, cfg, .. }) = &mut self.vm {
            *api = new_api;
            *cfg = new_cfg;
        }
    }
}

/// An opening error as the API reports it (the command line's `--disk: ` prefix dropped).
fn user_error(message: &str) -> ActionError {
    let line = ["--disk: ", "--net "]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .unwrap_or(message);
    ActionError::new(400, line)
}
