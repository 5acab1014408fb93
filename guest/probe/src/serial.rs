//! COM1 console (16550 at I/O port 0x3f8) via the `uart_16550` crate.

use core::fmt::{self, Write};
use spinning_top::Spinlock;
use uart_16550::{Uart16550, backend::PioBackend};
use x86_64::instructions::port::Port;

const COM1_PORT: u16 = 0x3f8;
use uart_16550::spec::FIFO_SIZE;

const fn com1() -> Uart16550<PioBackend> {
    // SAFETY: 0x3f8..0x400 is the PC COM1 port range; this module is its only user.
    match unsafe { Uart16550::new_port(COM1_PORT) } {
        Ok(uart) => uart,
        Err(_) => panic!("invalid COM1 port"),
    }
}

static COM1: Spinlock<Uart16550<PioBackend>> = Spinlock::new(com1());

/// Programs the UART: 115200 8N1, FIFOs on and cleared, DTR/RTS/OUT2, interrupts off.
///
/// Seven register writes instead of the crate's `init`, which probes the scratch register,
/// drains and reads back status (23 accesses): in a VM each access is an exit to the VMM, and
/// on PVM hosts the code around it is emulated too. The UART is taken to be a 16550A, as every
/// VMM this probe runs under emulates it (vm-superio, QEMU): the crate's handle keeps its
/// default belief that the FIFO is on (it is not read back from IIR), so output goes in
/// 16-byte bursts. A missing UART just drops the output.
pub fn init() {
    let _uart = COM1.lock();
    set(3, 0x80); // LCR: divisor latch access
    set(0, 1); // DLL: 115200 baud
    set(1, 0); // DLM
    set(3, 0x03); // LCR: 8 data bits, no parity, 1 stop bit
    set(2, 0xc7); // FCR: FIFOs on, both cleared, 14-byte receive trigger
    set(4, 0x0b); // MCR: DTR, RTS, OUT2 (the interrupt gate)
    set(1, 0); // IER: no interrupts (checks that want them enable their own)
}

/// One register write during [`init`] (inlined: a loop over a table costs emulated
/// instructions of its own).
#[inline(always)]
fn set(reg: u16, value: u8) {
    // SAFETY: the 16550's own registers, written while [`init`] holds its lock.
    unsafe { Port::<u8>::new(COM1_PORT + reg).write(value) };
}

struct Com1<'a>(&'a mut Uart16550<PioBackend>);

impl Write for Com1<'_> {
    /// `send_bytes_exact` with each burst as one `rep outsb`: the crate writes a burst byte by
    /// byte, and every instruction of a ring-0 loop is emulated on PVM.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let burst = if self.0.fifo_enabled() { FIFO_SIZE } else { 1 };
        for chunk in s.as_bytes().chunks(burst) {
            while self.0.ready_to_send().is_err() {
                core::hint::spin_loop();
            }
            // SAFETY: the transmitter is empty (checked just above), so it takes `burst` bytes
            // in a row; the string instruction only reads `chunk` and writes COM1's data port.
            unsafe {
                core::arch::asm!(
                    "rep outsb",
                    inout("rsi") chunk.as_ptr() => _,
                    inout("rcx") chunk.len() => _,
                    in("dx") COM1_PORT,
                    options(nostack, preserves_flags, readonly)
                );
            }
        }
        Ok(())
    }
}

/// Writes formatted text to COM1 (used by `print!`/`println!`).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut uart = COM1.lock();
    let _ = Com1(&mut uart).write_fmt(args);
}

/// A byte the host sent to COM1, if one is waiting.
pub fn try_read_byte() -> Option<u8> {
    COM1.lock().try_receive_byte().ok()
}

/// Writes formatted text, bypassing the lock (panic/exception paths, lock may be held).
pub fn print_fmt_emergency(args: fmt::Arguments<'_>) {
    let mut uart = com1();
    let _ = Com1(&mut uart).write_fmt(args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print_fmt(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
