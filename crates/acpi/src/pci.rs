//! The PCIe root bridge in the DSDT, and the motherboard resource that reserves its ECAM window
//! (Linux uses MMCONFIG only when the MCFG region is reserved this way).
//!
//! ```text
//! Device (PCI0) {                      // _HID PNP0A08 (PCIe), _CID PNP0A03 (PCI)
//!     _SEG 0, _BBN 0, _UID 0, _ADR 0
//!     _CRS { WordBusNumber 0..bus_end,
//!            IO 0xCF8 (8 ports, the config mechanism itself),
//!            WordIO 0..0xCF7, WordIO 0xD00..0xFFFF (the rest of port space, for I/O BARs),
//!            DWordMemory mmio32, QWordMemory mmio64 }
//!     _PRT { (slot, INTx pin) -> GSI, from PciConfig::intx_routes }
//!     Device (S01_) ... Device (S31_), Method (PCNT), Method (DVNT)   with hotplug: hotplug.rs
//! }
//! Device (MBRD) { _HID PNP0C02, _CRS { Memory32Fixed ECAM } }
//! ```

use acpi_tables::{Aml, aml};

use crate::PciConfig;
use crate::bytes::to_vec;
use crate::dsdt::{RawAml, crs, io_ports};

const CONFIG_PORT: u16 = 0xcf8;
const CONFIG_PORTS: u8 = 8;

pub(crate) fn root_bridge(pci: &PciConfig, hotplug: bool) -> RawAml {
    let bus_numbers = aml::AddressSpace::new_bus_number(0u16, u16::from(pci.bus_end));
    let config_ports = io_ports(CONFIG_PORT, CONFIG_PORTS);
    let io_low = aml::AddressSpace::new_io(0u16, CONFIG_PORT - 1, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffff, None);
    let (m32_start, m32_end) = pci.mmio32;
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        m32_start as u32,
        (m32_end - 1) as u32,
        None,
    );
    let (m64_start, m64_end) = pci.mmio64;
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        m64_start,
        m64_end - 1,
        None,
    );
    let crs = crs(vec![
        &bus_numbers,
        &config_ports,
        &io_low,
        &io_high,
        &mmio32,
        &mmio64,
    ]);

    let routes: Vec<RawAml> = pci
        .intx_routes
        .iter()
        .map(|&(slot, pin, gsi)| {
            // _ADR form: device in the high word, 0xFFFF = any function.
            let address = (u32::from(slot) << 16) | 0xffff;
            RawAml(to_vec(&aml::Package::new(vec![
                &address,
                &pin,
                &aml::ZERO,
                &gsi,
            ])))
        })
        .collect();
    let prt = aml::Name::new(
        "_PRT".into(),
        &aml::Package::new(routes.iter().map(|r| r as &dyn Aml).collect()),
    );

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let slots = if hotplug {
        crate::hotplug::root_bridge_children()
    } else {
        Vec::new()
    };
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt];
    children.extend(slots.iter().map(|s| s as &dyn Aml));
    RawAml(to_vec(&aml::Device::new("PCI0".into(), children)))
}

/// Reserves the ECAM window as a motherboard resource.
pub(crate) fn motherboard_resources(pci: &PciConfig) -> RawAml {
    let ecam = aml::Memory32Fixed::new(true, pci.ecam_base as u32, pci.ecam_size() as u32);
    RawAml(to_vec(&aml::Device::new(
        "MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &crs(vec![&ecam]),
        ],
    )))
}
