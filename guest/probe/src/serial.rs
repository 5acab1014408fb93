//! COM1 console (16550 at I/O port 0x3f8) via the `uart_16550` crate.

use core::fmt::{self, Write};
use spinning_top::Spinlock;
use uart_16550::{Config, Uart16550, backend::PioBackend};

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

/// Programs the UART (8N1, FIFO). A missing device is ignored: output then goes nowhere.
pub fn init() {
    let _ = COM1.lock().init(Config::default());
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
