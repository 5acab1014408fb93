//! A 16550A UART (vm-superio) whose output goes to a writer and whose input the VMM feeds.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::irq::IrqLine;

type Uart = vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The UART on the I/O bus: 8 registers at the base port.
pub struct Serial {
    uart: Uart,
}

impl Serial {
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(irq, out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A host-side write failure (closed stdout, full disk) must not stop the guest.
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::debug!("serial: {e:?}");
            }
        }
    }
}

/// The input side of a [`Serial`], shared with the thread that reads the host terminal.
#[derive(Clone)]
pub struct SerialInput(pub Arc<Mutex<Serial>>);

impl SerialInput {
    /// Queues as much of `bytes` as the receive FIFO takes; returns how many were taken.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let room = s.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        s.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_reaches_the_writer_and_input_is_readable() {
        let out = Shared::default();
        let irq = IrqLine::new(4).unwrap();
        let dev = Arc::new(Mutex::new(Serial::new(irq, Box::new(out.clone()))));
        dev.lock().unwrap().write(0, b"h");
        dev.lock().unwrap().write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");

        let input = SerialInput(dev.clone());
        assert_eq!(input.push(b"ok"), 2);
        let mut b = [0u8];
        dev.lock().unwrap().read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        dev.lock().unwrap().read(0, &mut b);
        assert_eq!(b[0], b'o');
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let irq = IrqLine::new(4).unwrap();
        let mut dev = Serial::new(irq, Box::new(std::io::sink()));
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        dev.write(9, &[1]);
        dev.write(0, &[1, 2]);
    }
}
