//! The `intx` check: a virtio device's legacy INTx interrupt, as a driver without MSI-X sees it.
//!
//! The first virtio-rng is brought up with MSI-X left disabled. Its Interrupt Pin / Interrupt
//! Line registers name the IOAPIC input (the GSI the DSDT's `_PRT` gives the slot); that
//! redirection entry is programmed as ACPI says GSI-routed PCI interrupts are (level-triggered,
//! active-low) to a vector whose handler only counts and EOIs. Then one 16-byte request:
//!
//! - the interrupt must arrive (`sti; hlt`, a LAPIC timer tick bounds each wait);
//! - the handler does not read the ISR, so after each EOI the line must come back: the level
//!   semantics (`reraised=yes`);
//! - reading the ISR must return the queue bit, and from then on the line must stay quiet
//!   (`quiet=yes`).
//!
//! The handlers run on IST1 (the exception stack: they do not fault, so they never share it),
//! because of the red zone. The check loads its own copy of the IDT and puts the original
//! back, masks the PIC, and leaves the IOAPIC entry masked and the timer stopped.

use crate::apic::{IoApic, Mmio, RTE_MASKED, install_handlers, io_apic};
use crate::pci::{self, Ecam};
use crate::time;
use crate::virtio::{self, ProbeHal};
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};
use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::{DeviceStatus, InterruptStatus, Transport};
use x86_64::instructions::port::Port;
use x86_64::instructions::tables::lidt;
use x86_64::registers::model_specific::Msr;

const RNG_MODERN: u16 = 0x1044;
const VEC_INTX: u8 = 0x40;
const VEC_TIMER: u8 = 0x41;
const VEC_SPURIOUS: u8 = 0xff;
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_ID: u64 = 0x20;
const APIC_EOI: u64 = 0xb0;
const APIC_SVR: u64 = 0xf0;
const APIC_LVT_TIMER: u64 = 0x320;
const APIC_TIMER_INIT: u64 = 0x380;
const APIC_TIMER_DIV: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// About 1 ms at KVM's 1 GHz APIC bus (divide by 1): only a wake-up for `hlt`.
const TIMER_COUNT: u32 = 1_000_000;
/// Redirection entry: level-triggered (bit 15), active-low (bit 13), physical, fixed.
const RTE_LEVEL_LOW: u32 = (1 << 15) | (1 << 13);
const CONFIG_INTERRUPT: u8 = 0x3c;
const CONFIG_COMMAND: u8 = 0x04;
const COMMAND_INTX_DISABLE: u32 = 1 << 10;
const CAP_ID_MSIX: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;
const QUEUE_SIZE: usize = 4;
const WAIT_US: u64 = 2_000_000;
/// Interrupts the line must deliver for the request before the ISR is read (each one EOI'd
/// without reading it).
const REASSERTIONS: u64 = 3;
const QUIET_US: u64 = 50_000;

static INTX_COUNT: AtomicU64 = AtomicU64::new(0);
static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// The local APIC's EOI register address, for the handlers.
static EOI_ADDR: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .pushsection .text.intx_isr, "ax"
intx_isr_device:
    lock incq {intx}(%rip)
    jmp intx_isr_eoi
intx_isr_timer:
    lock incq {ticks}(%rip)
intx_isr_eoi:
    pushq %rax
    movq {eoi}(%rip), %rax
    movl $0, (%rax)
    popq %rax
    iretq
intx_isr_spurious:
    iretq
    .popsection
"#,
    intx = sym INTX_COUNT,
    ticks = sym TIMER_TICKS,
    eoi = sym EOI_ADDR,
    options(att_syntax)
);

unsafe extern "C" {
    fn intx_isr_device();
    fn intx_isr_timer();
    fn intx_isr_spurious();
}

/// `sti; hlt` until `done` or `us` microseconds pass (the timer tick wakes `hlt`); interrupts
/// are off again on return.
fn wait(us: u64, done: impl Fn() -> bool) -> bool {
    let deadline = time::rdtsc() + time::ticks_for_us(us);
    loop {
        if done() {
            return true;
        }
        if time::rdtsc() > deadline {
            return false;
        }
        // SAFETY: handlers for every vector that can arrive are installed; `sti` takes effect
        // after `hlt` starts, so no wake-up is lost; interrupts are off again after.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// Everything the check changed, undone on drop (also on early returns).
struct Restore {
    idt: Option<x86_64::structures::DescriptorTablePointer>,
    lapic: Mmio,
    ioapic: Option<(IoApic, u32)>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        x86_64::instructions::interrupts::disable();
        self.lapic.write(APIC_TIMER_INIT, 0);
        self.lapic.write(APIC_LVT_TIMER, LVT_MASKED);
        if let Some((io, pin)) = &self.ioapic {
            io.write(0x10 + 2 * pin, RTE_MASKED);
        }
        if let Some(idt) = &self.idt {
            // SAFETY: the table the probe had loaded before the check; it lives forever.
            unsafe { lidt(idt) };
        }
    }
}

/// What the check needs from the function's configuration space: Interrupt Line and Pin.
fn intx_registers(ecam: &Ecam, df: DeviceFunction) -> Result<(u32, char), String> {
    let reg = ecam.read_word(df, CONFIG_INTERRUPT);
    let (line, pin) = (reg & 0xff, (reg >> 8) & 0xff);
    if !(1..=4).contains(&pin) {
        return Err(format!("{df} has no INTx pin (Interrupt Pin {pin})"));
    }
    if ecam.read_word(df, CONFIG_COMMAND) & COMMAND_INTX_DISABLE != 0 {
        return Err(format!("{df} starts with Interrupt Disable set"));
    }
    let msix_on = PciRoot::new(*ecam)
        .capabilities(df)
        .take(pci::MAX_CAPS)
        .any(|c| c.id == CAP_ID_MSIX && c.private_header & MSIX_ENABLE != 0);
    if msix_on {
        return Err(format!("{df} has MSI-X enabled"));
    }
    Ok((line, char::from(b'A' + pin as u8 - 1)))
}

pub fn check(rsdp: u64) -> Result<String, String> {
    let (df, mut transport) = virtio::open_first(rsdp, RNG_MODERN, "rng")?;
    let ecam = pci::find_ecam(rsdp)?;
    let (line, pin) = intx_registers(&ecam, df)?;
    // Declared before the queue, and the device is reset before either goes: it never writes
    // into freed memory, whichever way `run` returns.
    let mut buf = [0u8; 16];
    transport.begin_init(Feature::VERSION_1);
    let mut queue = VirtQueue::<ProbeHal, QUEUE_SIZE>::new(&mut transport, 0, false, false)
        .map_err(|e| format!("{df} queue 0: {e}"))?;
    transport.finish_init();
    let result = run(rsdp, line, pin, &mut transport, &mut queue, &mut buf);
    // Our device stops synchronously on the status write (its thread is joined).
    transport.set_status(DeviceStatus::empty());
    core::mem::forget(transport);
    drop(queue);
    result.map_err(|e| format!("{df} {e}"))
}

fn run(
    rsdp: u64,
    line: u32,
    pin_name: char,
    transport: &mut PciTransport,
    queue: &mut VirtQueue<ProbeHal, QUEUE_SIZE>,
    buf: &mut [u8],
) -> Result<String, String> {
    // SAFETY: reading IA32_APIC_BASE has no side effects.
    let apic_base = unsafe { Msr::new(IA32_APIC_BASE).read() } & 0xf_ffff_f000;
    let lapic = Mmio(apic_base);
    let ioapic = io_apic(rsdp)?;
    let rte = ioapic
        .pin(line)
        .ok_or_else(|| format!("Interrupt Line {line} is not an input of the IOAPIC"))?;

    x86_64::instructions::interrupts::disable();
    // The 8259s stay out of it (their ExtINT would reach vectors nothing handles).
    // SAFETY: OCW1 on the PICs' data ports: mask every input.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
    let mut restore = Restore {
        idt: None,
        lapic: Mmio(apic_base),
        ioapic: None,
    };
    let handlers = [
        (VEC_INTX, intx_isr_device as *const () as u64),
        (VEC_TIMER, intx_isr_timer as *const () as u64),
        (VEC_SPURIOUS, intx_isr_spurious as *const () as u64),
    ];
    // SAFETY: the stubs above are interrupt entry points ending in iretq that preserve every
    // register.
    restore.idt = Some(unsafe { install_handlers(&handlers) }?);
    EOI_ADDR.store(apic_base + APIC_EOI, Ordering::SeqCst);
    INTX_COUNT.store(0, Ordering::SeqCst);
    lapic.write(
        APIC_SVR,
        (lapic.read(APIC_SVR) & !0xff) | 0x100 | u32::from(VEC_SPURIOUS),
    );
    lapic.write(APIC_TIMER_DIV, 0b1011);
    lapic.write(APIC_LVT_TIMER, LVT_PERIODIC | u32::from(VEC_TIMER));
    lapic.write(APIC_TIMER_INIT, TIMER_COUNT);
    let bsp = lapic.read(APIC_ID) >> 24;
    ioapic.route(rte, RTE_LEVEL_LOW | u32::from(VEC_INTX), bsp);
    restore.ioapic = Some((ioapic, rte));

    let mut outs = [buf];
    // SAFETY: `outs` stays borrowed until pop_used below; `check` resets the device before
    // the buffer or the queue is freed.
    let token = unsafe { queue.add(&[], &mut outs) }.map_err(|e| format!("add: {e}"))?;
    if queue.should_notify() {
        transport.notify(0);
    }
    let count = || INTX_COUNT.load(Ordering::SeqCst);
    if !wait(WAIT_US, || count() >= 1) {
        let isr = transport.ack_interrupt();
        return Err(format!(
            "no interrupt on GSI {line} (INT{pin_name}) within {} ms; ISR {:#x}, used {}",
            WAIT_US / 1000,
            isr.bits(),
            queue.can_pop()
        ));
    }
    let reraised = wait(WAIT_US, || count() >= REASSERTIONS);
    let isr = transport.ack_interrupt();
    let before = count();
    wait(QUIET_US, || false);
    let settled = count();
    wait(QUIET_US, || false);
    let after = count();
    let quiet = settled - before <= 1 && after == settled;
    let ticks = TIMER_TICKS.load(Ordering::SeqCst);
    drop(restore);
    if !queue.can_pop() {
        return Err("request not completed".into());
    }
    // SAFETY: same buffers as passed to `add` for this token.
    let n = unsafe { queue.pop_used(token, &[], &mut outs) }.map_err(|e| format!("pop: {e}"))?;
    if !isr.contains(InterruptStatus::QUEUE_INTERRUPT) {
        return Err(format!("ISR read {:#x}, no queue bit", isr.bits()));
    }
    let yn = |b: bool| if b { "yes" } else { "no" };
    Ok(format!(
        "gsi={line} pin=INT{pin_name} isr={:#x} reraised={} quiet={} irqs={after} bytes={n} ticks={ticks}",
        isr.bits(),
        yn(reraised),
        yn(quiet),
    ))
}
