//! The PCIe host bridge at 00:00.0: only an identity, so guests see a normal root complex.

use crate::pci::config::{ConfigSpace, PciIds};
use crate::pci::device::{BarRequest, PciDevice};

/// Intel's id with Cloud Hypervisor's device id: guests know it needs no driver.
pub const VENDOR: u16 = 0x8086;
pub const DEVICE: u16 = 0x0d57;
const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_HOST: u8 = 0x00;

pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(PciIds {
                vendor: VENDOR,
                device: DEVICE,
                class: CLASS_BRIDGE,
                subclass: SUBCLASS_HOST,
                ..PciIds::default()
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_requests(&self) -> Vec<BarRequest> {
        Vec::new()
    }
    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}
