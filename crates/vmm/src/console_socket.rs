//! A guest console served on a Unix socket (`serial` mode `Socket`): one client at a time gets
//! the guest's output and types its input; a newer client takes over from an older one. The
//! output is also kept in a size-capped log, so what the guest printed while nobody was attached
//! is not lost.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::serial_io::HostInput;

/// Past this size the log is moved to `<log>.1` and a new one started.
pub const LOG_CAP: u64 = 1 << 20;

#[derive(Clone)]
pub struct SocketConsole {
    inner: Arc<Inner>,
}

struct Inner {
    /// The attached client and a number that tells its reader thread it was replaced.
    client: Mutex<(u64, Option<UnixStream>)>,
    log: Mutex<Option<CappedLog>>,
    input: Mutex<Option<HostInput>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SocketConsole {
    /// Listens on `socket` (a stale socket file is replaced) and keeps output in `log`.
    pub fn bind(socket: &Path, log: Option<&Path>) -> Result<Self> {
        let bad = |what: &str, path: &Path, e: std::io::Error| {
            Error::Config(format!("serial {what} {}: {e}", path.display()))
        };
        let log = log
            .map(|p| CappedLog::open(p, LOG_CAP).map_err(|e| bad("log file", p, e)))
            .transpose()?;
        if std::fs::symlink_metadata(socket)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            let _ = std::fs::remove_file(socket);
        }
        let listener = UnixListener::bind(socket).map_err(|e| bad("socket", socket, e))?;
        let console = Self {
            inner: Arc::new(Inner {
                client: Mutex::new((0, None)),
                log: Mutex::new(log),
                input: Mutex::new(None),
            }),
        };
        let accepting = console.clone();
        std::thread::Builder::new()
            .name("console-accept".into())
            .spawn(move || accepting.accept_loop(listener))
            .map_err(Error::io("spawning the console socket thread"))?;
        Ok(console)
    }

    fn accept_loop(&self, listener: UnixListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            let generation = {
                let mut client = lock(&self.inner.client);
                client.0 += 1;
                if let Some(old) = client.1.replace(stream) {
                    let _ = old.shutdown(std::net::Shutdown::Both);
                }
                client.0
            };
            let console = self.clone();
            let _ = std::thread::Builder::new()
                .name("console-in".into())
                .spawn(move || console.read_client(reader, generation));
        }
    }

    /// Passes a client's bytes to the guest until it disconnects or is replaced.
    fn read_client(&self, mut reader: UnixStream, generation: u64) {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            if lock(&self.inner.client).0 != generation {
                return;
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let taken = lock(&self.inner.input)
                    .as_ref()
                    .map_or(rest.len(), |input| input.push(rest));
                rest = &rest[taken..];
                if taken == 0 {
                    // The guest has not drained its FIFO yet.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        let mut client = lock(&self.inner.client);
        if client.0 == generation {
            client.1 = None;
        }
    }

    /// Where client input goes from now on (the current boot's console).
    pub fn attach_input(&self, input: Option<HostInput>) {
        *lock(&self.inner.input) = input;
    }

    /// The writer the guest's console transmits into.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(self.clone())
    }
}

impl Write for SocketConsole {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = lock(&self.inner.log).as_mut()
            && let Err(e) = log.write_all(data)
        {
            tracing::warn!("console log: {e}; no longer logging");
            *lock(&self.inner.log) = None;
        }
        let mut client = lock(&self.inner.client);
        if let Some(stream) = client.1.as_ref() {
            match send_nonblocking(stream, data) {
                Ok(_) => {}
                // Output must never stall a vCPU on a slow client: what it cannot take now is
                // dropped for it (and still in the log).
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => client.1 = None,
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends without blocking and without SIGPIPE. The stream itself stays blocking, because its
/// clone (same open file description) is the reader.
fn send_nonblocking(stream: &UnixStream, data: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `data` is a valid readable buffer of `data.len()` bytes for the duration of the
    // call, and the fd belongs to `stream`, which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// An append-only file that is moved aside to `<path>.1` when it reaches `cap` bytes.
pub struct CappedLog {
    path: PathBuf,
    file: File,
    size: u64,
    cap: u64,
}

impl CappedLog {
    pub fn open(path: &Path, cap: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            cap,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.size + data.len() as u64 > self.cap && self.size > 0 {
            self.rotate()?;
        }
        let n = self.file.write(data)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn log_rotates_at_its_cap_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 10).unwrap();
        log.write_all(b"0123456").unwrap();
        log.write_all(b"789ab").unwrap(); // would pass 10: the first part moves aside
        log.write_all(b"cd").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"789abcd");
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"0123456"
        );
    }

    #[test]
    fn a_client_gets_output_and_its_input_reaches_the_guest_side() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let log = dir.path().join("c.log");
        let mut console = SocketConsole::bind(&sock, Some(&log)).unwrap();
        console.write_all(b"before attach\n").unwrap();

        let client = UnixStream::connect(&sock).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The accept thread registers the client asynchronously.
        let mut lines = std::io::BufReader::new(client.try_clone().unwrap()).lines();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            console.write_all(b"hello\n").unwrap();
            if lock(&console.inner.client).1.is_some() {
                console.write_all(b"attached\n").unwrap();
                break;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let got: Vec<String> = (&mut lines)
            .map(|l| l.unwrap())
            .take_while(|l| l != "attached")
            .collect();
        assert!(got.iter().all(|l| l == "hello"), "{got:?}");
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.starts_with("before attach\nhello\n"), "{logged}");
        assert!(logged.ends_with("attached\n"), "{logged}");
    }
}
