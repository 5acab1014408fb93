//! Connecting the guest's consoles to the host: a terminal (raw, always restored), a file, or
//! nothing. COM1 follows `--serial`; the optional virtio console follows `--console`. Only one
//! of them reads stdin: the virtio console with `--console tty`, else COM1 with `--serial tty`.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

use hyperpool_devices::legacy::SerialInput;
use hyperpool_devices::virtio::ConsoleInput;

use crate::config::{ConsoleConfig, SerialConfig};
use crate::console_socket::SocketConsole;
use crate::error::{Error, Result};

/// Host-side console endpoints that outlive one boot of the VM: created once per process.
#[derive(Clone, Default)]
pub struct HostIo {
    pub serial_socket: Option<SocketConsole>,
}

impl HostIo {
    pub fn new(serial: &SerialConfig) -> Result<Self> {
        Ok(Self {
            serial_socket: match serial {
                SerialConfig::Socket { socket, log } => {
                    Some(SocketConsole::bind(socket, log.as_deref())?)
                }
                _ => None,
            },
        })
    }
}

/// The writer COM1 transmits into.
pub fn output(cfg: &SerialConfig, io: &HostIo) -> Result<Box<dyn Write + Send>> {
    Ok(match cfg {
        SerialConfig::Socket { .. } => match &io.serial_socket {
            Some(socket) => socket.writer(),
            None => return Err(Error::Devices("the serial socket was not set up".into())),
        },
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

/// The writer the virtio console transmits into; `None` for `--console off` (no device).
pub fn console_output(cfg: &ConsoleConfig) -> Result<Option<Box<dyn Write + Send>>> {
    Ok(match cfg {
        ConsoleConfig::Off => None,
        ConsoleConfig::Tty => Some(Box::new(std::io::stdout())),
        ConsoleConfig::File(path) => Some(Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::Config(format!("--console file={}: {e}", path.display())))?,
        )),
    })
}

/// Where the host's stdin goes.
#[derive(Clone)]
pub enum HostInput {
    Serial(SerialInput),
    Console(ConsoleInput),
}

impl HostInput {
    /// Queues as much of `bytes` as the guest side takes now; returns how many were taken.
    pub fn push(&self, bytes: &[u8]) -> usize {
        match self {
            Self::Serial(s) => s.push(bytes),
            Self::Console(c) => c.push(bytes),
        }
    }
}

/// The terminal settings before this process made stdin raw; `Some` while it is raw.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts the host terminal in raw mode while alive; restores it on drop and on panic.
pub struct RawTerminal(());

impl RawTerminal {
    /// `None` when stdin is not a terminal (piped input is passed through as it is).
    pub fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let fd = stdin.as_raw_fd();
        let mut saved = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr writes a termios into the buffer we own; we read it only on success.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: tcgetattr succeeded, so the termios is initialised.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the termios passed by reference.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the host's own messages (logs on stderr) still get \r\n.
        raw.c_oflag |= libc::OPOST;
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
        // SAFETY: applies a valid termios to our own stdin.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
            return None;
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
        Some(Self(()))
    }
}

/// Puts the terminal back as it was before [`RawTerminal::enter`], if this process changed it.
pub fn restore_terminal() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(saved) = saved {
        // SAFETY: restores the termios tcgetattr gave us for the same file descriptor.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &saved) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Feeds the host's stdin to the guest (COM1 or the virtio console) until stdin ends. The thread is detached: it may
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
