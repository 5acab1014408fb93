//! The `hotplug` check: the probe plays the part of an OS's ACPI PCI hotplug driver, doing by
//! hand what the DSDT's AML does for an OS with an interpreter (Hyperpool's layout: the GED's
//! event register at 0xFEB0_0000, the hotplug controller's at 0xFEB0_1000, as `PHPR` says).
//!
//! It prints `PROBE hotplug ready` and halts with interrupts on. On each GED interrupt it reads
//! the event register (which clears it); on the PCI hotplug bit it reads the controller's
//! "slots up" and "slots down" bitmaps (which clear too), as `_EVT` → `PCNT` would:
//! - a slot up: the function is found through ECAM; a virtio-blk gets the `blk` check's pattern
//!   (`HYPERPOOL-PROBE-<lba>` at LBA 1..8, flush, read back) and
//!   `PROBE hotplug ok slot=<n> <id>:rw` is printed; any other function
//!   `PROBE hotplug ok slot=<n> vvvv:dddd`;
//! - a slot down: the slot is ejected as `_EJ0` would (its bit written to the eject register),
//!   then the probe waits (bounded) until the slot reads empty through ECAM:
//!   `PROBE hotplug ejected slot=<n>` (or `FAIL` if the function stays).
//!
//! A press of the ACPI power button ends the check with the totals.

use crate::apic::Mmio;
use crate::idle::{self, GED_POWER_BUTTON};
use crate::pci::{self, Ecam};
use crate::virtio::{self, BarNote};
use crate::{blk, println, time};
use alloc::format;
use alloc::string::String;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

/// The GED event bit for "PCI slots changed" (the DSDT's `_EVT` tests the same bit).
const GED_PCI_HOTPLUG: u32 = 2;
/// The hotplug controller's registers: slots up, slots down, eject.
const HOTPLUG_REGS: u64 = 0xfeb0_1000;
const PCIU: u64 = 0x0;
const PCID: u64 = 0x4;
const B0EJ: u64 = 0x8;
/// How long an ejected function may stay visible.
const EJECT_TIMEOUT_US: u64 = 5_000_000;

fn slot_df(slot: u8) -> DeviceFunction {
    DeviceFunction {
        bus: 0,
        device: slot,
        function: 0,
    }
}

/// Runs until the power button; see the module documentation.
pub fn run(rsdp: u64) -> Result<String, String> {
    let ecam = pci::find_ecam(rsdp)?;
    let ged = idle::arm(rsdp)?;
    let controller = Mmio(HOTPLUG_REGS);
    println!("PROBE hotplug ready");
    let (mut plugged, mut ejected, mut seen) = (0u32, 0u32, 0u64);
    loop {
        idle::halt();
        if idle::ged_irqs() == seen {
            continue;
        }
        seen = idle::ged_irqs();
        let events = ged.read(0);
        if events & GED_PCI_HOTPLUG != 0 {
            let up = controller.read(PCIU);
            let down = controller.read(PCID);
            for slot in slots(up) {
                match added(rsdp, slot) {
                    Ok(what) => {
                        plugged += 1;
                        println!("PROBE hotplug ok slot={slot} {what}");
                    }
                    Err(why) => println!("PROBE hotplug FAIL slot={slot}: {why}"),
                }
            }
            for slot in slots(down) {
                controller.write(B0EJ, 1 << slot);
                match wait_gone(&ecam, slot) {
                    Ok(()) => {
                        ejected += 1;
                        println!("PROBE hotplug ejected slot={slot}");
                    }
                    Err(why) => println!("PROBE hotplug FAIL slot={slot}: {why}"),
                }
            }
        }
        if events & GED_POWER_BUTTON != 0 {
            return Ok(format!(
                "plugged={plugged} ejected={ejected} ged_irqs={}",
                idle::ged_irqs()
            ));
        }
    }
}

/// The slots (1..31) whose bits are set.
fn slots(bitmap: u32) -> impl Iterator<Item = u8> {
    (1..32u8).filter(move |s| bitmap & (1 << s) != 0)
}

/// Drives the function that appeared in `slot`.
fn added(rsdp: u64, slot: u8) -> Result<String, String> {
    let df = slot_df(slot);
    let mut found = virtio::find(rsdp, |_, f| f.df == df)?;
    let Some(f) = found.functions.first() else {
        return Err(format!("no virtio function at {df}"));
    };
    if f.device != blk::BLK_MODERN {
        let (vendor, device) = (f.vendor, f.device);
        // Brought up as far as the BARs: they must be assigned like any boot-time device's.
        drop(found.open(0, BarNote::Index)?);
        return Ok(format!("{vendor:04x}:{device:04x}"));
    }
    blk::check_disk(&mut found, 0)
}

/// Waits until `slot` reads empty (the VMM unplugs asynchronously after the eject).
fn wait_gone(ecam: &Ecam, slot: u8) -> Result<(), String> {
    let end = time::rdtsc() + time::ticks_for_us(EJECT_TIMEOUT_US);
    loop {
        let id = ecam.read_word(slot_df(slot), 0);
        if id & 0xffff == 0xffff {
            return Ok(());
        }
        if time::rdtsc() > end {
            return Err(format!("still present ({id:#010x}) after the eject"));
        }
        time::delay_us(1000);
    }
}
