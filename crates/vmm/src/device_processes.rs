//! Device models in processes of their own (crosvm's process-per-device design; the VM
//! configuration's `device_processes`): each disk and each TAP network card is served by a
//! `hyperpool device blk|net` child over vhost-user, with this VMM as its frontend. A compromised
//! device model then holds its own image or TAP and the guest's memory, not the VMM.
//!
//! A child starts the first time its device is opened and serves it for the life of this
//! process (a guest reboot reconnects to it). Children get the read end of a pipe whose write
//! end only this process holds (`--exit-with-fd`): when the VMM is gone, even by SIGKILL, the
//! read sees end-of-file and the child closes its device and exits. [`stop_all`] ends them in
//! order on a normal exit (SIGTERM: requests finish, qcow2 tables are written out).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyperpool_devices::virtio::net::device::random_mac;

use crate::config::{DiskConfig, DiskFormat, NetConfig, VhostUserConfig, VmConfig};
use crate::error::{Error, Result};

/// The largest queue our device models take (and what the probe's benchmarks use).
const QUEUE_SIZE: u16 = 256;
/// How long a child may take to bind its socket.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How long a child may take to close its device on SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A device child: what it serves (its `--disk`/`--net` spec), its socket, the MAC it was given.
struct Served {
    spec: String,
    socket: PathBuf,
    mac: Option<[u8; 6]>,
    child: Child,
}

struct Registry {
    dir: PathBuf,
    /// The pipe: the read end is passed to every child, the write end stays here.
    lifeline: (OwnedFd, OwnedFd),
    served: Vec<Served>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
/// Where the sockets go, if not a new directory under the temporary directory.
static SOCKET_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Puts the children's sockets in `dir` (e.g. the VM's own directory, which its owner removes
/// with the VM) rather than in a new directory under the temporary directory.
pub fn place_sockets_in(dir: PathBuf) {
    *SOCKET_DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir);
}

/// `cfg` with every disk and TAP network card that the VMM would open itself turned into a
/// vhost-user device served by a child; unchanged unless `cfg.device_processes`.
pub fn split_out(cfg: &VmConfig) -> Result<std::borrow::Cow<'_, VmConfig>> {
    if !cfg.device_processes {
        return Ok(std::borrow::Cow::Borrowed(cfg));
    }
    let mut out = cfg.clone();
    for d in out.disks.iter_mut() {
        *d = disk(d)?;
    }
    for n in out.nets.iter_mut() {
        *n = net(n)?;
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// The disk as a vhost-user disk served by a child (already vhost-user: unchanged).
pub fn disk(d: &DiskConfig) -> Result<DiskConfig> {
    if d.vhost_user.is_some() {
        return Ok(d.clone());
    }
    let mut spec = format!("path={}", spec_value("--disk", &d.path.to_string_lossy())?);
    if d.readonly {
        spec.push_str(",readonly=on");
    }
    spec.push_str(&format!(",num_queues={}", d.num_queues));
    if let Some(id) = &d.id {
        spec.push_str(&format!(",id={}", spec_value("--disk", id)?));
    }
    match d.format {
        Some(DiskFormat::Raw) => spec.push_str(",format=raw"),
        Some(DiskFormat::Qcow2) => spec.push_str(",format=qcow2"),
        None => {}
    }
    let (socket, _) = serve("blk", "--disk", spec, None)?;
    Ok(DiskConfig {
        path: PathBuf::new(),
        readonly: false,
        num_queues: d.num_queues,
        id: d.id.clone(),
        format: None,
        vhost_user: Some(VhostUserConfig {
            socket,
            queue_size: QUEUE_SIZE,
        }),
    })
}

/// The network card as a vhost-user one served by a child on its TAP (vhost-user already, or
/// TAP queues passed over the API: unchanged). The MAC is drawn once and given to both sides.
pub fn net(n: &NetConfig) -> Result<NetConfig> {
    if n.vhost_user.is_some() || !n.fds.is_empty() {
        return Ok(n.clone());
    }
    let spec = format!(
        "tap={},num_queues={}",
        spec_value("--net", &n.tap)?,
        n.num_queues
    );
    let mac = match n.mac {
        Some(m) => m,
        None => random_mac().map_err(Error::io("drawing a MAC address"))?,
    };
    let (socket, mac) = serve("net", "--net", spec, Some(mac))?;
    Ok(NetConfig {
        tap: String::new(),
        fds: Vec::new(),
        mac,
        num_queues: n.num_queues,
        vhost_user: Some(VhostUserConfig {
            socket,
            queue_size: QUEUE_SIZE,
        }),
    })
}

/// A value inside a `key=value,...` spec: the grammar has no quoting.
fn spec_value<'a>(flag: &str, v: &'a str) -> Result<&'a str> {
    if v.contains([',', '=']) {
        return Err(Error::Config(format!(
            "{flag}: '{v}' contains ',' or '=', which a device process cannot be given; rename it or turn device processes off"
        )));
    }
    Ok(v)
}

/// The socket of the child serving `spec` (started now if there is none), and its MAC.
fn serve(
    kind: &str,
    flag: &str,
    mut spec: String,
    mac: Option<[u8; 6]>,
) -> Result<(PathBuf, Option<[u8; 6]>)> {
    let mut guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(Registry::new()?);
    }
    let Some(reg) = guard.as_mut() else {
        return Err(Error::Config("device processes: no registry".into()));
    };
    if let Some(s) = reg.served.iter().find(|s| s.spec == spec) {
        return Ok((s.socket.clone(), s.mac));
    }
    let key = spec.clone();
    if let Some(m) = mac {
        spec.push_str(&format!(
            ",mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ));
    }
    let socket = reg.dir.join(format!("{kind}{}.sock", reg.served.len()));
    let exe = std::env::current_exe().map_err(Error::io("finding the hyperpool binary"))?;
    let mut child = Command::new(exe)
        .args(["device", kind, "--socket"])
        .arg(&socket)
        .arg(flag)
        .arg(&spec)
        .arg("--exit-with-fd")
        .arg(reg.lifeline.0.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(Error::io("starting a device process"))?;
    if let Err(why) = wait_ready(&mut child) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Config(format!(
            "{flag} {spec}: the device process {why}"
        )));
    }
    tracing::info!("{kind} device process {} serves {flag} {spec}", child.id());
    reg.served.push(Served {
        spec: key,
        socket: socket.clone(),
        mac,
        child,
    });
    Ok((socket, mac))
}

/// Waits for the child's readiness line (it prints its socket once it accepts connections).
fn wait_ready(child: &mut Child) -> std::result::Result<(), String> {
    let Some(out) = child.stdout.take() else {
        return Err("has no stdout".into());
    };
    // SAFETY: fcntl on the pipe we own: non-blocking reads, so the deadline holds.
    unsafe {
        let flags = libc::fcntl(out.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(out.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut out = std::fs::File::from(OwnedFd::from(out));
    let deadline = Instant::now() + START_LIMIT;
    let mut byte = [0u8; 1];
    loop {
        match std::io::Read::read(&mut out, &mut byte) {
            Ok(1) if byte[0] == b'\n' => return Ok(()),
            Ok(1) => continue,
            Ok(_) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!("failed ({status}); see its message above"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("readiness pipe: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!("did not listen within {START_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Registry {
    fn new() -> Result<Self> {
        let dir = SOCKET_DIR
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("hyperpool-{}-devices", std::process::id()))
            });
        std::fs::create_dir_all(&dir)
            .map_err(Error::io("creating the device sockets' directory"))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(Error::io("creating the device sockets' directory"))?;
        Ok(Self {
            dir,
            lifeline: lifeline()?,
            served: Vec::new(),
        })
    }
}

/// A pipe whose read end children inherit (close-on-exec cleared) and whose write end does not.
fn lifeline() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("creating the device processes' pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFD on an fd we own; 0 clears FD_CLOEXEC so exec'd children keep it.
    if unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(Error::io("creating the device processes' pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok((read, write))
}

/// Ends every device child (SIGTERM, then SIGKILL after [`STOP_LIMIT`]) and removes the
/// sockets' directory. For the VMM's normal exit; a killed VMM's children go by themselves.
pub fn stop_all() {
    let Some(mut reg) = REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    for s in &reg.served {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_LIMIT;
    for s in &mut reg.served {
        while matches!(s.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                tracing::warn!("device process {} ignored SIGTERM; killed", s.child.id());
                let _ = s.child.kill();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    remove_dir(&reg.dir);
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::debug!("removing {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_with_separators_are_refused() {
        assert!(spec_value("--disk", "/var/lib/a,b.img").is_err());
        assert!(spec_value("--disk", "a=b").is_err());
        assert_eq!(spec_value("--disk", "/x/y.img").unwrap(), "/x/y.img");
    }

    #[test]
    fn a_config_without_device_processes_is_untouched() {
        let cfg = VmConfig::default();
        assert!(matches!(
            split_out(&cfg).unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn the_lifeline_read_end_survives_exec_and_the_write_end_does_not() {
        let (read, write) = lifeline().unwrap();
        // SAFETY: F_GETFD on fds we own.
        let (r, w) = unsafe {
            (
                libc::fcntl(read.as_raw_fd(), libc::F_GETFD),
                libc::fcntl(write.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_eq!(r & libc::FD_CLOEXEC, 0);
        assert_eq!(w & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
