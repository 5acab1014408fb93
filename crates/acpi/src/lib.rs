//! Guest ACPI tables for Hyperpool's x86-64 guests.
//!
//! [`build`] turns an [`AcpiConfig`] into an RSDP plus the XSDT, FADT (`FACP`),
//! DSDT, MADT (`APIC`) and, with PCI, the MCFG, already placed at guest-physical addresses inside
//! `[rsdp_addr, tables_end)` and checksummed. The table layouts come from the
//! rust-vmm `acpi_tables` crate; this crate only decides their contents and
//! placement. Building is pure (no KVM): [`AcpiTables::write_to`] copies the
//! result into guest memory and [`AcpiTables::dump`] writes the files
//! `iasl -d` disassembles.

mod bytes;
mod dsdt;
mod error;
mod fadt;
mod ged;
mod hotplug;
mod layout;
mod madt;
mod mcfg;

mod pci;
mod root;

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

pub use error::AcpiError;
pub use ged::POWER_BUTTON_EVENT;
pub use hotplug::PCI_HOTPLUG_EVENT;
use layout::Placer;

/// OEM id written in every table header and the RSDP.
pub const OEM_ID: [u8; 6] = *b"HYPRPL";
/// OEM table id written in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"HYPERPOO";
/// OEM revision written in every table header.
pub const OEM_REVISION: u32 = 1;
/// Largest vCPU count: processor devices are named `C000`..`CFFF` in the DSDT.
pub const MAX_CPUS: u32 = 0x1000;
/// Alignment of the RSDP (required by the spec) and of every table (ours).
pub const TABLE_ALIGN: u64 = 16;

/// What the guest platform looks like, as far as ACPI is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; their APIC ids are `0..cpus`. Ids >= 255 get x2APIC MADT entries.
    pub cpus: u32,
    /// Guest-physical address of the RSDP (16-byte aligned), e.g. 0xE0000.
    pub rsdp_addr: u64,
    /// Exclusive end of the region the RSDP and all tables must fit in, e.g. 0x100000.
    pub tables_end: u64,
    /// Local APIC base address (MADT header).
    pub lapic_addr: u32,
    /// IOAPIC base address.
    pub ioapic_addr: u32,
    /// IOAPIC id.
    pub ioapic_id: u8,
    /// First GSI routed through the IOAPIC.
    pub ioapic_gsi_base: u32,
    /// 1-byte I/O port of the FADT SLEEP_CONTROL_REG.
    pub sleep_control_port: u16,
    /// 1-byte I/O port of the FADT SLEEP_STATUS_REG.
    pub sleep_status_port: u16,
    /// 1-byte I/O port of the FADT RESET_REG.
    pub reset_port: u16,
    /// Value the guest writes to `reset_port` to reset.
    pub reset_value: u8,
    /// SLP_TYP for S5, published as `\_S5_` = `Package { typ, 0, 0, 0 }`.
    pub s5_sleep_type: u8,
    /// 16550 UART (COM1) as (I/O base, IRQ): a PNP0501 device in the DSDT.
    pub serial: Option<(u16, u8)>,
    /// i8042 keyboard controller at 0x60/0x64, IRQ 1: a PNP0303 device.
    pub i8042: bool,
    /// CMOS RTC as (I/O base, IRQ): a PNP0B00 device.
    pub rtc: Option<(u16, u8)>,
    /// The PCIe root bridge: an MCFG table and `PCI0` in the DSDT.
    pub pci: Option<PciConfig>,
    /// The power button's Generic Event Device as (MMIO address of its event register, GSI).
    pub ged: Option<(u32, u32)>,
    /// MMIO address of the PCI hotplug controller's registers: slot devices under `PCI0` and
    /// the GED's PCI hotplug event. Needs `pci` and `ged`.
    pub pci_hotplug: Option<u32>,
}

/// The PCIe root complex as ACPI describes it: segment 0, buses `0..=bus_end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciConfig {
    /// ECAM base (bus 0); 1 MiB per bus, reserved as a PNP0C02 motherboard resource.
    pub ecam_base: u64,
    pub bus_end: u8,
    /// `[start, end)` of the 32-bit BAR window (below 4 GiB).
    pub mmio32: (u64, u64),
    /// `[start, end)` of the 64-bit BAR window.
    pub mmio64: (u64, u64),
    /// `_PRT`: (slot, pin 0 = INTA#..3 = INTD#, GSI) for every slot that may have INTx.
    pub intx_routes: Vec<(u8, u8, u32)>,
}

impl PciConfig {
    /// Bytes of ECAM for buses `0..=bus_end`.
    pub fn ecam_size(&self) -> u64 {
        (u64::from(self.bus_end) + 1) << 20
    }
}

impl Default for PciConfig {
    /// Bus 0 only, ECAM at 0xE000_0000, BARs in 0xC000_0000..0xE000_0000 and 64 GiB from
    /// 64 GiB, INTx of slots 1..31 swizzled over GSIs 16..19.
    fn default() -> Self {
        Self {
            ecam_base: 0xe000_0000,
            bus_end: 0,
            mmio32: (0xc000_0000, 0xe000_0000),
            mmio64: (64 << 30, 128 << 30),
            intx_routes: (1..32u8)
                .flat_map(|slot| {
                    (0..4u8).map(move |pin| (slot, pin, 16 + u32::from((slot + pin) % 4)))
                })
                .collect(),
        }
    }
}

impl Default for AcpiConfig {
    /// One vCPU on a PC-like layout: tables in the BIOS area 0xE0000..0x100000,
    /// standard APIC addresses, sleep/reset ports 0x600..0x602, COM1, i8042 and RTC.
    fn default() -> Self {
        Self {
            cpus: 1,
            rsdp_addr: 0xE_0000,
            tables_end: 0x10_0000,
            lapic_addr: 0xFEE0_0000,
            ioapic_addr: 0xFEC0_0000,
            ioapic_id: 0,
            ioapic_gsi_base: 0,
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 0x01,
            s5_sleep_type: 5,
            serial: Some((0x3F8, 4)),
            i8042: true,
            rtc: Some((0x70, 8)),
            pci: Some(PciConfig::default()),
            ged: Some((0xfeb0_0000, 5)),
            pci_hotplug: Some(0xfeb0_1000),
        }
    }
}

/// One finished ACPI table: its bytes (checksum valid) and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    pub signature: [u8; 4],
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The RSDP and every table it (transitively) points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp_addr: u64,
    /// The 36-byte ACPI 2.0+ RSDP.
    pub rsdp: Vec<u8>,
    /// XSDT, FACP, DSDT, APIC, then MCFG when there is PCI, in ascending address order.
    pub tables: Vec<AcpiTable>,
}

/// Builds and places every table described by `cfg`.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    if cfg.cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if cfg.cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus {
            cpus: cfg.cpus,
            max: MAX_CPUS,
        });
    }

    // DSDT and MADT do not depend on any address, so build them first; then
    // every size is known and the layout can be decided in one pass.
    let dsdt = dsdt::build(cfg);
    let madt = madt::build(cfg);
    let mcfg = cfg.pci.as_ref().map(mcfg::build);
    // FACP, APIC, MCFG (the DSDT hangs off the FADT).
    let xsdt_entries = 2 + usize::from(mcfg.is_some());

    let mut placer = Placer::new(cfg.rsdp_addr, cfg.tables_end, TABLE_ALIGN)?;
    let rsdp_addr = placer.place(root::RSDP_LEN)?;
    let xsdt_addr = placer.place(root::xsdt_len(xsdt_entries))?;
    let fadt_addr = placer.place(fadt::LEN)?;
    let dsdt_addr = placer.place(dsdt.len())?;
    let madt_addr = placer.place(madt.len())?;
    let mcfg_addr = mcfg.as_ref().map(|t| placer.place(t.len())).transpose()?;

    let fadt = fadt::build(cfg, dsdt_addr);
    let mut entries = vec![fadt_addr, madt_addr];
    entries.extend(mcfg_addr);
    let xsdt = root::build_xsdt(&entries);
    let rsdp = root::build_rsdp(xsdt_addr);
    debug_assert_eq!(rsdp.len(), root::RSDP_LEN);
    debug_assert_eq!(xsdt.len(), root::xsdt_len(xsdt_entries));
    debug_assert!(mcfg.as_ref().is_none_or(|t| t.len() == mcfg::LEN));
    debug_assert_eq!(fadt.len(), fadt::LEN);

    let table = |signature: &[u8; 4], addr, bytes| AcpiTable {
        signature: *signature,
        addr,
        bytes,
    };
    let mut tables = vec![
        table(b"XSDT", xsdt_addr, xsdt),
        table(b"FACP", fadt_addr, fadt),
        table(b"DSDT", dsdt_addr, dsdt),
        table(b"APIC", madt_addr, madt),
    ];
    if let (Some(addr), Some(bytes)) = (mcfg_addr, mcfg) {
        tables.push(table(b"MCFG", addr, bytes));
    }
    Ok(AcpiTables {
        rsdp_addr,
        rsdp,
        tables,
    })
}

impl AcpiTables {
    /// The table with this signature, if built.
    pub fn table(&self, signature: &[u8; 4]) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| &t.signature == signature)
    }

    /// Copies the RSDP and all tables into guest memory. Every write is
    /// bounds-checked by vm-memory; a table that does not fit entirely in
    /// guest RAM is an error (nothing is silently truncated).
    pub fn write_to<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), AcpiError> {
        let write = |signature: &[u8; 4], addr: u64, bytes: &[u8]| {
            mem.write_slice(bytes, GuestAddress(addr))
                .map_err(|source| AcpiError::GuestMemory {
                    signature: String::from_utf8_lossy(signature).into_owned(),
                    addr,
                    source,
                })
        };
        write(b"RSDP", self.rsdp_addr, &self.rsdp)?;
        for t in &self.tables {
            write(&t.signature, t.addr, &t.bytes)?;
        }
        Ok(())
    }

    /// Writes `RSDP.dat` and one `<SIGNATURE>.dat` per table into `dir`
    /// (created if missing): raw table images, the input `iasl -d` takes.
    pub fn dump(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("RSDP.dat"), &self.rsdp)?;
        for t in &self.tables {
            let name = format!("{}.dat", String::from_utf8_lossy(&t.signature));
            std::fs::write(dir.join(name), &t.bytes)?;
        }
        Ok(())
    }
}
