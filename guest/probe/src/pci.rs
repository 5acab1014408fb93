//! PCI: ECAM access (base from the ACPI MCFG, parsed by the `acpi` crate) for the
//! `virtio-drivers` crate's `PciRoot`, and the `pci` check: enumerate bus 0, list each
//! function's ids, class, BARs (as assigned by the VMM or firmware) and MSI-X capability.
//!
//! Nothing here assigns BARs: an unassigned BAR is reported as a failure, because the VMM
//! (like firmware) must place them before the guest runs.

use crate::acpi;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, MemoryBarType, PciRoot,
};

/// PCI capability id of MSI-X.
const CAP_ID_MSIX: u8 = 0x11;
/// Capability lists longer than this are treated as looping.
pub const MAX_CAPS: usize = 48;
const INVALID: u32 = 0xffff_ffff;

/// ECAM window of one MCFG entry (segment 0, covering bus 0), identity mapped.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    /// Physical address of bus `bus_start`'s configuration space.
    pub base: u64,
    pub bus_start: u8,
    pub bus_end: u8,
}

impl Ecam {
    /// Address of a function's register, or `None` outside the MCFG bus range.
    fn addr(&self, df: DeviceFunction, offset: u8) -> Option<u64> {
        if df.bus < self.bus_start || df.bus > self.bus_end || !df.valid() {
            return None;
        }
        let bus = u64::from(df.bus - self.bus_start);
        let off = u64::from(offset & 0xfc);
        Some(
            self.base
                + ((bus << 20) | (u64::from(df.device) << 15) | (u64::from(df.function) << 12))
                + off,
        )
    }
}

impl ConfigurationAccess for Ecam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        match self.addr(df, offset) {
            // SAFETY: the MCFG names this range as ECAM (checked to be identity mapped in
            // `find_ecam`); a 32-bit aligned MMIO read.
            Some(a) => unsafe { (a as *const u32).read_volatile() },
            None => INVALID,
        }
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        if let Some(a) = self.addr(df, offset) {
            // SAFETY: as in read_word; writes go to PCI configuration registers only.
            unsafe { (a as *mut u32).write_volatile(data) }
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        *self
    }
}

/// Finds the ECAM window for segment 0, bus 0 in the MCFG.
pub fn find_ecam(rsdp: u64) -> Result<Ecam, String> {
    let tables = acpi::tables(rsdp)?;
    let mcfg = tables
        .find_table::<::acpi::mcfg::Mcfg>()
        .map_err(|e| format!("no MCFG: {e:?}"))?;
    let entries: Vec<Ecam> = mcfg
        .entries()
        .iter()
        .filter(|e| {
            let seg = e.pci_segment_group;
            seg == 0
        })
        .map(|e| Ecam {
            base: e.base_address,
            bus_start: e.bus_number_start,
            bus_end: e.bus_number_end,
        })
        .collect();
    let ecam = entries
        .iter()
        .find(|e| e.bus_start == 0 && e.bus_end >= e.bus_start)
        .copied()
        .ok_or_else(|| format!("MCFG has no entry for segment 0 bus 0 ({entries:x?})"))?;
    let span = (u64::from(ecam.bus_end - ecam.bus_start) + 1) << 20;
    // Only bus 0 is accessed: its 1 MiB must be inside the identity map.
    if ecam.base == 0
        || ecam.base & 0xfffff != 0
        || ecam.base + (1 << 20) > crate::paging::MAPPED_LIMIT
    {
        return Err(format!(
            "MCFG ECAM base {:#x} (buses {}-{}, {} MiB) unusable",
            ecam.base,
            ecam.bus_start,
            ecam.bus_end,
            span >> 20
        ));
    }
    Ok(ecam)
}

/// One function found on bus 0.
pub struct Function {
    pub df: DeviceFunction,
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: u32,
    pub header_type: u8,
}

impl Function {
    /// Number of BAR slots in this header type (0: standard 6, 1: bridge 2, 2: CardBus 1).
    fn bar_slots(&self) -> u8 {
        match self.header_type & 0x7f {
            0 => 6,
            1 => 2,
            2 => 1,
            _ => 0,
        }
    }
}

/// Lists the functions on `bus` (functions 1-7 only for multi-function devices).
pub fn scan_bus(ecam: &Ecam, bus: u8) -> Vec<Function> {
    let mut out = Vec::new();
    for device in 0..32u8 {
        for function in 0..8u8 {
            let df = DeviceFunction {
                bus,
                device,
                function,
            };
            let id = ecam.read_word(df, 0);
            if id == INVALID || id & 0xffff == 0xffff || id & 0xffff == 0 {
                if function == 0 {
                    break;
                }
                continue;
            }
            let class = ecam.read_word(df, 8) >> 8;
            let header_type = (ecam.read_word(df, 12) >> 16) as u8;
            out.push(Function {
                df,
                vendor: id as u16,
                device: (id >> 16) as u16,
                class,
                header_type,
            });
            if function == 0 && header_type & 0x80 == 0 {
                break;
            }
        }
    }
    out
}

/// A BAR as read (sized) through the crate, with its slot index.
pub struct Bar {
    pub index: u8,
    pub info: BarInfo,
}

impl Bar {
    pub fn address(&self) -> u64 {
        match self.info {
            BarInfo::Memory { address, .. } => address,
            BarInfo::IO { address, .. } => u64::from(address),
        }
    }

    pub fn size(&self) -> u64 {
        match self.info {
            BarInfo::Memory { size, .. } => size,
            BarInfo::IO { size, .. } => u64::from(size),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.info {
            BarInfo::IO { .. } => "io",
            BarInfo::Memory {
                address_type,
                prefetchable,
                ..
            } => match (address_type, prefetchable) {
                (MemoryBarType::Width64, true) => "mem64-pf",
                (MemoryBarType::Width64, false) => "mem64",
                (MemoryBarType::Width32, true) => "mem32-pf",
                (MemoryBarType::Width32, false) => "mem32",
                (MemoryBarType::Below1MiB, _) => "mem1m",
            },
        }
    }
}

/// Reads (and sizes) the implemented BARs of `f`.
pub fn bars(root: &mut PciRoot<Ecam>, f: &Function) -> Result<Vec<Bar>, String> {
    let mut out = Vec::new();
    let slots = f.bar_slots();
    let mut index = 0;
    while index < slots {
        let info = root
            .bar_info(f.df, index)
            .map_err(|e| format!("{} bar{index}: {e}", f.df))?;
        let mut step = 1;
        if let Some(info) = info {
            if info.takes_two_entries() {
                step = 2;
            }
            out.push(Bar { index, info });
        }
        index += step;
    }
    Ok(out)
}

/// MSI-X table size, if the function has an MSI-X capability.
pub fn msix_table_size(root: &PciRoot<Ecam>, df: DeviceFunction) -> Option<u16> {
    root.capabilities(df)
        .take(MAX_CAPS)
        .find(|c| c.id == CAP_ID_MSIX)
        .map(|c| (c.private_header & 0x7ff) + 1)
}

/// Enables memory and I/O decoding and bus mastering (the OS's part, not the firmware's).
pub fn enable(root: &mut PciRoot<Ecam>, df: DeviceFunction) {
    let (_, cmd) = root.get_status_command(df);
    root.set_command(
        df,
        cmd | Command::MEMORY_SPACE | Command::IO_SPACE | Command::BUS_MASTER,
    );
}

fn size_str(size: u64) -> String {
    match size {
        s if s >= 1 << 30 && s % (1 << 30) == 0 => format!("{}G", s >> 30),
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{}M", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{}K", s >> 10),
        s => format!("{s}"),
    }
}

/// The `pci` check.
pub fn check(rsdp: u64) -> Result<String, String> {
    let ecam = find_ecam(rsdp)?;
    let host = ecam.read_word(
        DeviceFunction {
            bus: 0,
            device: 0,
            function: 0,
        },
        0,
    );
    if host == INVALID || host == 0 {
        return Err(format!(
            "ECAM at {:#x} unreadable: 00:00.0 reads {host:#010x} (no host bridge)",
            ecam.base
        ));
    }
    let mut root = PciRoot::new(ecam);
    let functions = scan_bus(&ecam, 0);
    println!(
        "pci: ecam={:#x} buses={}-{} functions={}",
        ecam.base,
        ecam.bus_start,
        ecam.bus_end,
        functions.len()
    );
    let mut summary: Vec<String> = Vec::new();
    let mut unassigned: Vec<String> = Vec::new();
    let mut host_bridge = false;
    for f in &functions {
        host_bridge |= f.class >> 8 == 0x0600;
        let bars = bars(&mut root, f)?;
        let msix = msix_table_size(&root, f.df);
        let mut line = format!(
            "pci: {} {:04x}:{:04x} class={:06x} hdr={:#04x}",
            f.df, f.vendor, f.device, f.class, f.header_type
        );
        for b in &bars {
            line.push_str(&format!(
                " bar{}={}:{:#x}+{}",
                b.index,
                b.kind(),
                b.address(),
                size_str(b.size())
            ));
            if b.address() == 0 {
                unassigned.push(format!(
                    "{} bar{} ({} {})",
                    f.df,
                    b.index,
                    b.kind(),
                    size_str(b.size())
                ));
            }
        }
        if let Some(n) = msix {
            line.push_str(&format!(" msix={n}"));
        }
        println!("{line}");
        summary.push(format!(
            "{} {:04x}:{:04x} {:06x}{}",
            f.df,
            f.vendor,
            f.device,
            f.class,
            if msix.is_some() { " msix" } else { "" }
        ));
    }
    if !host_bridge {
        return Err(format!(
            "no host bridge (class 0600) on bus 0: {}",
            summary.join(",")
        ));
    }
    if !unassigned.is_empty() {
        return Err(format!("unassigned BARs: {}", unassigned.join(",")));
    }
    Ok(format!("devices={} {}", functions.len(), summary.join(",")))
}
