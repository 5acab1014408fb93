//! `hyperpool device blk|net|vsock|rng --socket PATH`: one device model in its own process,
//! served to a vhost-user frontend. The device is opened (image locked, TAP attached, vsock
//! socket bound) and the vhost-user socket bound first; then the process gives up everything
//! else (no new privileges, a seccomp allow-list) and serves frontends one after another.
//! SIGTERM or SIGINT remove the socket and exit 0.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyperpool_devices::vhost_user::backend::{DeviceBackend, SharedBackend, serve};
use hyperpool_devices::virtio::{Rng, VirtioDevice, Vsock};
use hyperpool_vmm::config::{DiskConfig, NetConfig};

use crate::Failure;
use crate::cli::{DeviceCommand, SocketArg};
use crate::sandbox::{self, Needs};

pub fn run(cmd: DeviceCommand) -> Result<u8, Failure> {
    let (name, socket, device, needs): (&str, SocketArg, Box<dyn VirtioDevice>, Needs) = match cmd {
        DeviceCommand::Blk { socket, disk } => {
            let needs = Needs {
                resize_files: true,
                ..Needs::default()
            };
            ("vhost-user-blk", socket, open_disk(&disk)?, needs)
        }
        DeviceCommand::Net { socket, net } => {
            ("vhost-user-net", socket, open_net(&net)?, Needs::default())
        }
        DeviceCommand::Vsock { socket, vsock } => {
            let dev = Vsock::new(u64::from(vsock.cid), &vsock.socket).map_err(|e| {
                Failure::usage(format!("--vsock socket={}: {e}", vsock.socket.display()))
            })?;
            let needs = Needs {
                unix_connect: true,
                ..Needs::default()
            };
            ("vhost-user-vsock", socket, Box::new(dev), needs)
        }
        DeviceCommand::Rng { socket } => (
            "vhost-user-rng",
            socket,
            Box::new(Rng::new()),
            Needs::default(),
        ),
    };
    let SocketArg {
        socket,
        exit_with_fd,
    } = socket;
    let lifeline = exit_with_fd.map(adopt_lifeline).transpose()?;
    let listener = bind(&socket)?;
    let backend = Arc::new(Mutex::new(DeviceBackend::new(name, device)));
    close_on_signal(socket.clone(), backend.clone())?;
    if let Some(fd) = lifeline {
        close_with_parent(fd, socket.clone(), backend.clone())?;
    }
    sandbox::apply(needs).map_err(Failure::runtime)?;
    tracing::info!("{name}: serving on {}", socket.display());
    // The readiness signal for whoever started us: the socket accepts connections from now on.
    // (Ignoring a closed stdout: nobody is waiting then.)
    let _ = writeln!(std::io::stdout(), "{}", socket.display());
    serve(&listener, &backend, name)
        .map_err(|e| Failure::runtime(format!("{}: accept: {e}", socket.display())))?;
    Ok(0)
}

/// Takes ownership of the inherited `--exit-with-fd`, which must be an open pipe.
fn adopt_lifeline(fd: i32) -> Result<OwnedFd, Failure> {
    let bad = || Failure::usage(format!("--exit-with-fd {fd}: not an inherited pipe"));
    if fd < 3 {
        return Err(bad());
    }
    // SAFETY: an all-zero stat struct is valid storage for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes the status of `fd` into `st`; a number that is not an open fd
    // gives EBADF.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    if rc != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(bad());
    }
    // SAFETY: the fd is open (fstat succeeded), was inherited for this purpose, and nothing
    // else in this process refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A thread that waits for the parent's end of `lifeline` to close, then removes the socket,
/// closes the device (requests finish, tables are written out) and exits 0.
fn close_with_parent(
    lifeline: OwnedFd,
    socket: PathBuf,
    backend: SharedBackend,
) -> Result<(), Failure> {
    std::thread::Builder::new()
        .name("lifeline".into())
        .spawn(move || {
            let mut pipe = std::fs::File::from(lifeline);
            let mut buf = [0u8; 64];
            // Nothing is ever written: any return means the writer is gone (or the pipe broke).
            while matches!(std::io::Read::read(&mut pipe, &mut buf), Ok(n) if n > 0) {}
            tracing::info!(
                "the parent is gone: removing {} and exiting",
                socket.display()
            );
            let _ = std::fs::remove_file(&socket);
            backend.lock().unwrap_or_else(|e| e.into_inner()).close();
            std::process::exit(0);
        })
        .map(|_| ())
        .map_err(|e| Failure::runtime(format!("lifeline thread: {e}")))
}

/// The device models `hyperpool run` would build (same opening, locking and checks); errors are
/// the user's (exit 2).
fn open_disk(d: &DiskConfig) -> Result<Box<dyn VirtioDevice>, Failure> {
    let block = hyperpool_vmm::open_image(d).map_err(|e| Failure::usage(e.to_string()))?;
    Ok(Box::new(block))
}

fn open_net(cfg: &NetConfig) -> Result<Box<dyn VirtioDevice>, Failure> {
    let net = hyperpool_vmm::open_tap(cfg).map_err(|e| Failure::usage(e.to_string()))?;
    Ok(Box::new(net))
}

/// Binds the socket, replacing a stale one (a socket file nobody listens on) but never another
/// kind of file or a live backend's socket.
fn bind(path: &Path) -> Result<UnixListener, Failure> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Failure::usage(format!(
                "--socket {}: exists and is not a socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Failure::usage(format!(
                "--socket {}: another process is listening on it",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    // Created 0600 (no window in which others could connect), and set so explicitly too.
    // SAFETY: umask only swaps the process's file mode mask; no other thread exists yet.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener =
        bound.map_err(|e| Failure::usage(format!("--socket {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Failure::runtime(format!("--socket {}: chmod: {e}", path.display())))?;
    Ok(listener)
}

/// SIGTERM and SIGINT are taken by a thread of their own (blocked everywhere else, so the
/// device threads spawned later never see them): it removes the socket, closes the device
/// (requests in flight finish, a qcow2 image's tables are written out) and exits 0.
fn close_on_signal(socket: PathBuf, backend: SharedBackend) -> Result<(), Failure> {
    // SAFETY: a zeroed sigset_t is valid storage for sigemptyset/sigaddset, which only write it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; blocking the two signals in this (the main) thread
    // before any other thread exists makes every later thread inherit the mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Failure::runtime(format!(
            "blocking signals: {}",
            std::io::Error::from_raw_os_error(rc)
        )));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` and `sig` are valid for the call; the signals are blocked.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            tracing::info!("signal {sig}: removing {} and exiting", socket.display());
            let _ = std::fs::remove_file(&socket);
            backend.lock().unwrap_or_else(|e| e.into_inner()).close();
            std::process::exit(0);
        })
        .map_err(|e| Failure::runtime(format!("signal thread: {e}")))?;
    Ok(())
}
