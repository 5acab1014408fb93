//! Connecting the guest's COM1 to the host: a terminal (raw, always restored), a file, or nothing.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmm_sys_util::terminal::Terminal;

use crate::config::SerialConfig;
use crate::error::{Error, Result};

/// The writer COM1 transmits into.
pub fn output(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>> {
    Ok(match cfg {
        SerialConfig::Tty => Box::new(std::io::stdout()),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::Config(format!("--serial file={}: {e}", path.display())))?,
        ),
    })
}

static RAW: AtomicBool = AtomicBool::new(false);

/// Puts the host terminal in raw mode while alive; restores it on drop and on panic.
pub struct RawTerminal(());

impl RawTerminal {
    /// `None` when stdin is not a terminal (piped input is passed through as it is).
    pub fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() || stdin.lock().set_raw_mode().is_err() {
            return None;
        }
        RAW.store(true, Ordering::SeqCst);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
        Some(Self(()))
    }
}

/// Puts the terminal back in canonical mode if this process made it raw.
pub fn restore_terminal() {
    if RAW.swap(false, Ordering::SeqCst) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Feeds the host's stdin to the guest's COM1 until stdin ends. The thread is detached: it may
/// sit in `read` when the VM ends, and the process exit reaps it.
/// `push` takes bytes and returns how many the guest accepted.
pub fn spawn_stdin_pump(push: impl Fn(&[u8]) -> usize + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = push(rest);
                    rest = &rest[taken..];
                    if taken == 0 {
                        // The guest has not drained its FIFO yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(Error::io("spawning the serial input thread"))
}
