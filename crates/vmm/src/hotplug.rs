//! Devices added to and removed from a running VM (ACPI PCI hotplug, as Cloud Hypervisor does it).
//!
//! Adding: the device (already opened and validated by the caller) goes into a free slot with
//! its BARs, MSI-X vectors and ioeventfds, exactly as at boot; then the hotplug controller's
//! "slots up" bit is set and the GED raises its PCI hotplug event, on which the guest's DSDT
//! sends the slot a device check and the OS enumerates it.
//!
//! Removing takes the guest's cooperation: the host sets "slots down" and raises the event;
//! the OS lets go of the function and runs the slot's `_EJ0`, whose write to the controller's
//! eject register reaches [`Machine::ejected`] (through the controlling thread). Only then does
//! the device go: unplugged from the segment, its threads stopped, its fds unregistered, its
//! BARs, GSIs and slot freed, its files closed. A guest that never ejects keeps the device, as
//! on real hardware; the request can be repeated.

use hyperpool_devices::legacy::Ged;
use hyperpool_devices::virtio::{CounterSet, VirtioDevice};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::machine::{DeviceInfo, Machine, add_virtio};

/// The kinds of device the API hot-plugs; their counters are named `disk<n>`, `net<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Disk,
    Net,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Disk => "disk",
            Kind::Net => "net",
        }
    }
}

/// `0000:00:SS.0`, the bus/device/function Cloud Hypervisor reports for a device.
pub fn bdf(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
}

impl Machine {
    /// Gives the boot-time devices of `kind` their API ids, in configuration order.
    pub fn name_devices(&mut self, kind: Kind, ids: &[Option<String>]) {
        for (i, id) in ids.iter().enumerate() {
            let key = format!("{}{i}", kind.prefix());
            if let Some(d) = self.devices.iter_mut().find(|d| d.id == key) {
                d.api_id.clone_from(id);
            }
        }
    }

    /// Whether a slot is free for [`Machine::hot_add`].
    pub fn has_free_slot(&self) -> bool {
        self.pci.free_slot().is_some()
    }

    /// Plugs `device` into the running VM and tells the guest; returns its slot.
    pub fn hot_add(
        &mut self,
        kind: Kind,
        api_id: &str,
        device: Box<dyn VirtioDevice>,
        counters: Arc<dyn CounterSet>,
    ) -> Result<u8> {
        let (slot, lines) = add_virtio(&self.pci, &self.memory, device)?;
        let key = (0..)
            .map(|n| format!("{}{n}", kind.prefix()))
            .find(|k| self.devices.iter().all(|d| &d.id != k))
            .unwrap_or_default();
        tracing::info!("hot-plugged {api_id} ({key}) at {}", bdf(slot));
        self.devices.push(DeviceInfo {
            id: key,
            counters,
            slot,
            lines,
            api_id: Some(api_id.to_owned()),
        });
        self.lock_hotplug().plugged(slot);
        self.raise_hotplug_event()?;
        Ok(slot)
    }

    /// Asks the guest to let go of the device with API id `api_id`; false if there is none.
    pub fn request_removal(&mut self, api_id: &str) -> Result<bool> {
        let Some(slot) = self.slot_of(api_id) else {
            return Ok(false);
        };
        self.lock_hotplug().request_removal(slot);
        self.raise_hotplug_event()?;
        Ok(true)
    }

    /// The guest ejected `slots` (a bitmap the controller accepted): unplugs those devices and
    /// returns the API ids of the ones removed.
    pub fn ejected(&mut self, slots: u32) -> Vec<String> {
        let mut removed = Vec::new();
        for slot in (0..32u8).filter(|s| slots & (1 << s) != 0) {
            let Some(at) = self.devices.iter().position(|d| d.slot == slot) else {
                continue;
            };
            let info = self.devices.remove(at);
            if let Some(device) = self.pci.remove_device(slot, &info.lines) {
                // The last reference: dropping it joins the device's threads and closes its
                // files. A vCPU thread in the middle of an access holds its own clone briefly.
                drop(device);
            }
            tracing::info!("the guest ejected {} ({})", bdf(slot), info.id);
            removed.extend(info.api_id);
        }
        removed
    }

    /// Whether the device with API id `api_id` is plugged in.
    pub fn has_device(&self, api_id: &str) -> bool {
        self.slot_of(api_id).is_some()
    }

    fn slot_of(&self, api_id: &str) -> Option<u8> {
        self.devices
            .iter()
            .find(|d| d.api_id.as_deref() == Some(api_id))
            .map(|d| d.slot)
    }

    fn lock_hotplug(&self) -> std::sync::MutexGuard<'_, hyperpool_devices::pci::PciHotplug> {
        self.hotplug.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise_hotplug_event(&self) -> Result<()> {
        self.ged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify(Ged::PCI_HOTPLUG)
            .map_err(Error::io("raising the PCI hotplug event"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_is_cloud_hypervisors_form() {
        assert_eq!(bdf(5), "0000:00:05.0");
        assert_eq!(bdf(31), "0000:00:1f.0");
    }
}
