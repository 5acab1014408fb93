//! The `idle` check: the probe stays up the way a server guest does — halted with interrupts on —
//! so many of them cost the host nothing while they wait. It answers a line `ping` on COM1 with
//! `pong`, and powers off when the ACPI power button is pressed. It never returns.
//!
//! COM1's receive interrupt (ISA IRQ 4) and the power button's Generic Event Device (GSI 5,
//! event register at 0xFEB0_0000: Hyperpool's layout, as the DSDT's `GED_` says) are routed
//! through the IOAPIC, edge-triggered and active-high like ISA interrupts. The handlers only
//! count and EOI; the main loop does the work between `hlt`s. They run on IST1 because of the
//! red zone.

use crate::apic::{Mmio, install_handlers, io_apic};
use crate::println;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

const VEC_SERIAL: u8 = 0x50;
const VEC_GED: u8 = 0x51;
const VEC_SPURIOUS: u8 = 0xff;
const COM1_GSI: u32 = 4;
const GED_GSI: u32 = 5;
const GED_EVENTS: u64 = 0xfeb0_0000;
pub const GED_POWER_BUTTON: u32 = 1;
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_ID: u64 = 0x20;
const APIC_EOI: u64 = 0xb0;
const APIC_SVR: u64 = 0xf0;
const COM1: u16 = 0x3f8;
const UART_IER: u16 = 1;
const UART_LSR: u16 = 5;
const IER_RX_AVAILABLE: u8 = 1;
const LSR_DATA_READY: u8 = 1;
const PING: &[u8] = b"ping";

static SERIAL_IRQS: AtomicU64 = AtomicU64::new(0);
static GED_IRQS: AtomicU64 = AtomicU64::new(0);
static EOI_ADDR: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .pushsection .text.idle_isr, "ax"
idle_isr_serial:
    lock incq {serial}(%rip)
    jmp idle_isr_eoi
idle_isr_ged:
    lock incq {ged}(%rip)
idle_isr_eoi:
    pushq %rax
    movq {eoi}(%rip), %rax
    movl $0, (%rax)
    popq %rax
    iretq
idle_isr_spurious:
    iretq
    .popsection
"#,
    serial = sym SERIAL_IRQS,
    ged = sym GED_IRQS,
    eoi = sym EOI_ADDR,
    options(att_syntax)
);

unsafe extern "C" {
    fn idle_isr_serial();
    fn idle_isr_ged();
    fn idle_isr_spurious();
}

fn port(offset: u16) -> Port<u8> {
    Port::new(COM1 + offset)
}

/// Routes COM1's receive interrupt and the GED's through the IOAPIC to this CPU and installs
/// their handlers (interrupts stay off until [`halt`]); returns the GED's event register.
/// Shared with the `hotplug` check, which waits for the GED the same way.
pub fn arm(rsdp: u64) -> Result<Mmio, String> {
    x86_64::instructions::interrupts::disable();
    // SAFETY: reading IA32_APIC_BASE has no side effects.
    let apic_base = unsafe { Msr::new(IA32_APIC_BASE).read() } & 0xf_ffff_f000;
    let lapic = Mmio(apic_base);
    let ioapic = io_apic(rsdp)?;
    let pins = ioapic.pins([COM1_GSI, GED_GSI]);
    let [Some(serial_pin), Some(ged_pin)] = pins else {
        return Err(format!("GSIs {COM1_GSI}/{GED_GSI} are not IOAPIC inputs"));
    };
    // SAFETY: OCW1 on the PICs' data ports: mask every input (the IOAPIC delivers instead).
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
    let handlers = [
        (VEC_SERIAL, idle_isr_serial as *const () as u64),
        (VEC_GED, idle_isr_ged as *const () as u64),
        (VEC_SPURIOUS, idle_isr_spurious as *const () as u64),
    ];
    // SAFETY: the stubs above are interrupt entry points ending in iretq that preserve every
    // register. The check never returns to a world without these vectors except to power off.
    unsafe { install_handlers(&handlers) }?;
    EOI_ADDR.store(apic_base + APIC_EOI, Ordering::SeqCst);
    lapic.write(
        APIC_SVR,
        (lapic.read(APIC_SVR) & !0xff) | 0x100 | u32::from(VEC_SPURIOUS),
    );
    let me = lapic.read(APIC_ID) >> 24;
    // Edge-triggered, active-high, fixed delivery, physical destination: the ISA defaults.
    ioapic.route(serial_pin, u32::from(VEC_SERIAL), me);
    ioapic.route(ged_pin, u32::from(VEC_GED), me);
    // SAFETY: 16550 register: enable the receive interrupt (`serial::init` already opened its
    // output gate, MCR.OUT2).
    unsafe { port(UART_IER).write(IER_RX_AVAILABLE) };
    Ok(Mmio(GED_EVENTS))
}

/// Halts until an interrupt arrives (after [`arm`]); returns with interrupts off again.
pub fn halt() {
    // SAFETY: [`arm`] installed handlers for every vector that can arrive; `sti` takes effect
    // after `hlt` starts, so an interrupt pending since the last pass still wakes it.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// GED interrupts taken so far.
pub fn ged_irqs() -> u64 {
    GED_IRQS.load(Ordering::SeqCst)
}

/// Sets everything up, says `PROBE idle ready`, then serves until the power button.
pub fn run(rsdp: u64) -> Result<String, String> {
    let ged = arm(rsdp)?;
    println!("PROBE idle ready");

    let mut line = PingLine::new();
    loop {
        halt();
        // SAFETY: reading the 16550's status and data registers.
        while unsafe { port(UART_LSR).read() } & LSR_DATA_READY != 0 {
            // SAFETY: as above.
            if line.push(unsafe { port(0).read() }) {
                println!("pong");
            }
        }
        if GED_IRQS.load(Ordering::SeqCst) > 0 && ged.read(0) & GED_POWER_BUTTON != 0 {
            println!("PROBE idle power-button");
            return Ok(format!(
                "serial_irqs={} ged_irqs={}",
                SERIAL_IRQS.load(Ordering::SeqCst),
                GED_IRQS.load(Ordering::SeqCst)
            ));
        }
    }
}

/// Recognises lines that are exactly `ping`, byte by byte, without buffering the line (a
/// buffer to clear is emulated work at every start on PVM hosts).
struct PingLine {
    /// Bytes of the current line so far, if they are a prefix of `ping`.
    matched: Option<usize>,
}

impl PingLine {
    const fn new() -> Self {
        Self { matched: Some(0) }
    }

    /// Takes one received byte; true when it ends a `ping` line.
    fn push(&mut self, byte: u8) -> bool {
        if byte == b'\r' || byte == b'\n' {
            let ping = self.matched == Some(PING.len());
            self.matched = Some(0);
            return ping;
        }
        self.matched = self
            .matched
            .filter(|&n| PING.get(n) == Some(&byte))
            .map(|n| n + 1);
        false
    }
}
