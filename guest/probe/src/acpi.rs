//! ACPI: identity-mapping handler for the `acpi` crate, the `acpi` check (raw checksum
//! walk of RSDP → XSDT → tables), and FADT/DSDT helpers for the end actions.

use acpi::address::{AddressSpace, GenericAddress};
use acpi::fadt::Fadt;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use x86_64::instructions::port::Port;

/// Tables larger than this are treated as corrupt.
const MAX_TABLE_LEN: u32 = 16 << 20;

/// All memory is identity mapped, so mapping is just a cast.
#[derive(Clone, Copy, Debug)]
pub struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let ptr = NonNull::new(phys as *mut T).expect("ACPI table at physical address 0");
        // SAFETY: physical memory below 64 GiB is identity mapped; the caller guarantees the
        // region holds a T.
        unsafe { PhysicalMapping::new(phys, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Parses the tables reachable from the RSDP with the `acpi` crate.
pub fn tables(rsdp: u64) -> Result<AcpiTables<IdentityHandler>, String> {
    if rsdp == 0 {
        return Err("no RSDP (rsdp_paddr = 0)".into());
    }
    // SAFETY: the VMM passes the RSDP address in start_info; memory is identity mapped.
    unsafe { AcpiTables::from_rsdp(IdentityHandler, rsdp as usize) }
        .map_err(|e| format!("acpi: {e:?}"))
}

fn bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: callers pass firmware table ranges below the identity-mapped limit, which the
    // VMM keeps unchanged for the whole run.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

fn read_u32(addr: u64) -> u32 {
    u32::from_le_bytes(bytes(addr, 4).try_into().unwrap_or([0; 4]))
}

fn read_u64(addr: u64) -> u64 {
    u64::from_le_bytes(bytes(addr, 8).try_into().unwrap_or([0; 8]))
}

fn checksum_ok(addr: u64, len: usize) -> bool {
    bytes(addr, len).iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

fn sig_str(addr: u64) -> String {
    bytes(addr, 4)
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

fn valid_addr(addr: u64) -> bool {
    addr != 0 && addr < crate::paging::MAPPED_LIMIT
}

/// Checks one SDT's length and checksum; returns its signature.
fn check_sdt(addr: u64, what: &str) -> Result<String, String> {
    if !valid_addr(addr) {
        return Err(format!("{what} at bad address {addr:#x}"));
    }
    let sig = sig_str(addr);
    let len = read_u32(addr + 4);
    if !(36..=MAX_TABLE_LEN).contains(&len) {
        return Err(format!("{sig} at {addr:#x} has bad length {len}"));
    }
    if !checksum_ok(addr, len as usize) {
        return Err(format!("{sig} checksum wrong (at {addr:#x}, length {len})"));
    }
    Ok(sig)
}

/// The `acpi` check: RSDP signature and both checksums, XSDT (or RSDT), and every table
/// (plus the DSDT reached through the FADT).
pub fn check(rsdp: u64) -> Result<String, String> {
    if !valid_addr(rsdp) {
        return Err(format!("no RSDP (rsdp_paddr={rsdp:#x})"));
    }
    if bytes(rsdp, 8) != b"RSD PTR " {
        return Err(format!("RSDP signature wrong at {rsdp:#x}"));
    }
    if !checksum_ok(rsdp, 20) {
        return Err("RSDP checksum wrong".into());
    }
    let revision = bytes(rsdp, 16)[15];
    let (root, entry_size) = if revision >= 2 {
        let len = read_u32(rsdp + 20);
        if !(36..=4096).contains(&len) || !checksum_ok(rsdp, len as usize) {
            return Err("RSDP extended checksum wrong".into());
        }
        (read_u64(rsdp + 24), 8)
    } else {
        (read_u32(rsdp + 16) as u64, 4)
    };
    let root_sig = check_sdt(root, "XSDT")?;
    let want = if entry_size == 8 { "XSDT" } else { "RSDT" };
    if root_sig != want {
        return Err(format!("root table signature {root_sig}, expected {want}"));
    }
    let root_len = read_u32(root + 4) as u64;
    let mut sigs: Vec<String> = Vec::new();
    let mut entry = root + 36;
    while entry + entry_size <= root + root_len {
        let table = if entry_size == 8 {
            read_u64(entry)
        } else {
            read_u32(entry) as u64
        };
        let sig = check_sdt(table, "table")?;
        let is_fadt = sig == "FACP";
        sigs.push(sig);
        if is_fadt {
            let dsdt = fadt_dsdt_address(table);
            let dsdt_sig = check_sdt(dsdt, "DSDT")?;
            if dsdt_sig != "DSDT" {
                return Err(format!("FADT DSDT pointer leads to {dsdt_sig}"));
            }
            sigs.push(dsdt_sig);
        }
        entry += entry_size;
    }
    Ok(format!("rsdp={rsdp:#x} tables={}", sigs.join(",")))
}

/// X_DSDT (offset 140) when present and non-zero, else DSDT (offset 40).
fn fadt_dsdt_address(fadt: u64) -> u64 {
    let len = read_u32(fadt + 4);
    let x = if len >= 148 { read_u64(fadt + 140) } else { 0 };
    if x != 0 {
        x
    } else {
        read_u32(fadt + 40) as u64
    }
}

/// SLP_TYP for S5 from the DSDT's `\_S5_` package (first element).
pub fn s5_slp_typ(tables: &AcpiTables<IdentityHandler>) -> Result<u8, String> {
    let dsdt = tables.dsdt().map_err(|e| format!("no DSDT: {e:?}"))?;
    let aml = bytes(dsdt.address as u64, dsdt.length as usize);
    let pos = aml
        .windows(4)
        .position(|w| w == b"_S5_")
        .ok_or("no _S5_ in DSDT")?;
    let mut p = &aml[pos + 4..];
    // PackageOp PkgLength NumElements FirstElement
    if p.first() != Some(&0x12) {
        return Err("_S5_ is not a package".into());
    }
    let extra = (p.get(1).copied().unwrap_or(0) >> 6) as usize;
    p = p.get(2 + extra + 1..).ok_or("_S5_ package truncated")?;
    match p {
        [0x0a, v, ..] => Ok(*v),        // BytePrefix
        [0x00, ..] => Ok(0),            // ZeroOp
        [0x01, ..] => Ok(1),            // OneOp
        [v, ..] if *v < 0x08 => Ok(*v), // bare small integer (lenient)
        _ => Err("_S5_ first element not a byte constant".into()),
    }
}

/// The FADT, via the `acpi` crate.
pub fn fadt(
    tables: &AcpiTables<IdentityHandler>,
) -> Result<PhysicalMapping<IdentityHandler, Fadt>, String> {
    tables
        .find_table::<Fadt>()
        .map_err(|e| format!("no FADT: {e:?}"))
}

/// Writes `value` to a Generic Address Structure register (system I/O or memory).
pub fn gas_write(reg: &GenericAddress, value: u64) -> Result<(), String> {
    let width = match reg.bit_width {
        0 | 8 => 8,
        w => w,
    };
    match reg.address_space {
        AddressSpace::SystemIo => {
            let port = reg.address as u16;
            // SAFETY: the firmware tables name this port as the register to write.
            unsafe {
                match width {
                    16 => Port::<u16>::new(port).write(value as u16),
                    32 => Port::<u32>::new(port).write(value as u32),
                    _ => Port::<u8>::new(port).write(value as u8),
                }
            }
            Ok(())
        }
        AddressSpace::SystemMemory if valid_addr(reg.address) => {
            let a = reg.address;
            // SAFETY: the firmware tables name this MMIO address (identity mapped) as the
            // register to write.
            unsafe {
                match width {
                    16 => (a as *mut u16).write_volatile(value as u16),
                    32 => (a as *mut u32).write_volatile(value as u32),
                    64 => (a as *mut u64).write_volatile(value),
                    _ => (a as *mut u8).write_volatile(value as u8),
                }
            }
            Ok(())
        }
        s => Err(format!("unsupported register {s:?} at {:#x}", reg.address)),
    }
}

/// Writes `value` to the legacy PM1a_CNT_BLK I/O port (FADT offset 64).
pub fn pm1a_cnt_port_write(fadt: u64, value: u16) -> Result<(), String> {
    let port = read_u32(fadt + 64);
    if port == 0 || port > 0xffff {
        return Err(format!("no PM1a control block (PM1a_CNT_BLK={port:#x})"));
    }
    // SAFETY: the FADT names this port as the PM1a control register.
    unsafe { Port::<u16>::new(port as u16).write(value) };
    Ok(())
}
